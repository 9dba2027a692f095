"""The LightningCLI of ``retention fit``: its options (model, data, trainer, ``--optimizer``/``--lr_scheduler``,
``run``, the pipeline callbacks), the checks made before any model is loaded, the trainer it builds around the run
folder, and running it. ``retention study`` resolves and runs its runs through the same functions.

Checks before work: every closed choice (editor, protocols, the freeze policy) and the learning rates right after
parsing (``--print_config`` included); the layers named against the model's config when the objects are built; the
knowledge and task files before the run folder is made. No model is loaded before them, and a fresh run that fails
before its first optimizer step deletes its folder.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from filelock import FileLock
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from typing_extensions import override

from retention.arch import out_of_range
from retention.callbacks import PIPELINE
from retention.callbacks.checkpoint import LastCheckpoint, RunIdentity, flatten
from retention.callbacks.freeze import NEEDS_EDITS
from retention.config import expand_config_includes
from retention.data.datamodule import TaskDataModule
from retention.data.readers import BUILTIN_SETS
from retention.data.tasks.sources import HF_PREFIX
from retention.editing.registry import editor_class
from retention.models import ModelNotFound, check_model_name, model_num_layers
from retention.modules.finetune import FineTuneModule, check_learning_rate
from retention.runfolder import (
    RESUME_FREE_KEYS,
    check_resume,
    finish_run_folder,
    launched_as_rank_zero,
    prepare_run_folder,
    resume_point,
    rewind_run_folder,
)
from retention.runlog import RunConfig, StepProgressBar, fit_summary, run_loggers
from retention.scoring import check_protocols

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    # A step budget rather than Lightning's 1000 epochs; set trainer.max_epochs (and max_steps: -1) for epochs.
    "max_steps": 100,
    # The DataModule shards its own loaders (validation without repeated samples; docs/design.md).
    "use_distributed_sampler": False,
    # run.validate_first measures the model before training, so no sanity check is needed.
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    # No Lightning default checkpoint: `retention fit` adds its LastCheckpoint (run.checkpoint_every).
    "enable_checkpointing": False,
}
UNSET_WHEN_NONE = ("optimizer", "lr_scheduler")
"""Keys left out of a resolved config while unset, so that configs without them keep their digests."""
OFF_REMEDIES = {
    "rehearsal": lambda group: not group.get("rate"),
    "anchor": lambda group: group.get("method") == "none" or not group.get("strength"),
    "after": lambda group: group.get("mode") == "none",
}
"""Remedy groups left out of a resolved config while they do nothing, for the same reason."""
LEFT_OUT_AT_DEFAULT = {("monitor", "share_t0"): True, ("monitor", "precision"): "32"}
"""Options left out of a resolved config while at their default, for the same reason."""


@dataclass
class RunArgs:
    """Where a run writes and what it does around ``trainer.fit``."""

    name: str | None = None
    """Run folder name under ``out_dir``; default ``<task family>-<source name>-<method>``."""
    out_dir: str = "runs"
    """Folder holding the run folders."""
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """W&B logging: ``auto`` is online when W&B credentials exist (WANDB_API_KEY or ~/.netrc), else offline
    (sync later with ``wandb sync <run folder>/wandb/offline-run-*``); ``disabled`` turns it off."""
    validate_first: bool = True
    """Validate before training, so the report shows the loss before and after fine-tuning."""
    save_model: bool = False
    """Export the fine-tuned model (adapters merged) to ``<run folder>/model``."""
    group: str | None = None
    """W&B run group (``retention study`` sets it to the study's name)."""
    tags: list[str] | None = None
    """W&B run tags (``retention study`` sets the arm, the grid cell and the seed)."""
    overwrite: bool = False
    """Replace an existing run folder of this name (its files are deleted first). Without it an existing folder
    is refused, unless the run resumes from its checkpoint (``--ckpt_path last``). A folder another run is
    using, or one that no run wrote, is never replaced."""
    checkpoint_every: int = 50
    """Rewrite ``<run folder>/checkpoints/last.ckpt`` every this many optimizer steps, for ``--ckpt_path last``
    after an interruption (trainable weights, optimizer, data position, curves and the edit); 0 for none."""
    keep_checkpoint: bool = False
    """Keep ``last.ckpt`` after the run has finished (by default it is deleted: it exists to resume, and holds
    ~1.6 GB for a full fine-tune of the default model)."""
    resume_changes: list[str] | None = None
    """Keys of the resolved config (dotted, e.g. ``model.optimizer.lr``; ``"*"`` for any) that may differ from
    the run that wrote the checkpoint on ``--ckpt_path``; a data file's content changes under its key.
    Without it a resume with another config or data is refused. ``config.yaml`` records both values."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"run.checkpoint_every={self.checkpoint_every}: must be >= 0")


def default_run_name(data: TaskDataModule, model: FineTuneModule) -> str:
    task = data.task_config
    source = Path(task.source).stem if task.source != "builtin" else "builtin"
    return re.sub(r"[^\w.-]+", "_", f"{task.family}-{source}-{model.adapter.method}")


def check_choices(config: Namespace) -> None:
    """Raise ValueError naming the flag of a closed choice outside its choices, an ``--optimizer.lr`` that is not
    a positive finite number (``config``: the parsed fit config; ``model.optimizer.lr`` is checked by its
    dataclass), or ``--run.save_model`` with an editor whose edits no weight holds."""
    checks = (("--edits.editor", editor_class, config.edits.editor),
              ("--edits.known_protocol", check_protocols,
               [p for p in [config.edits.known_protocol] if p != "none"]),  # none: every fact counts as known
              ("--monitor.protocols", check_protocols, config.monitor.protocols or []))
    for flag, check, value in checks:
        try:
            check(value)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
    lr = (config.get("optimizer") or Namespace()).get("init_args", Namespace()).get("lr")
    if lr is not None:
        check_learning_rate("--optimizer.lr", lr)
    if config.run.save_model and config.edits.n_edit and editor_class(config.edits.editor)[0].edits_in_memory:
        raise ValueError(f"--run.save_model: {config.edits.editor} keeps its edits in a memory module beside the "
                         "weights, so an exported model would be the fine-tuned model without them; leave "
                         "run.save_model off with this editor (docs/editors.md)")


def check_sources(config: Namespace) -> None:
    """Raise ValueError naming the flag of a model, knowledge or task file that does not exist (``config``: the
    parsed fit config). Checked when a run starts, not when a config resolves: a study's dry run may precede the
    data."""
    try:
        check_model_name(str(config.model.model_name))
    except ModelNotFound as err:
        raise ValueError(f"--model.model_name: {err}") from None
    edits = config.edits
    knowledge = str(edits.knowledge)
    if (edits.n_edit or edits.n_control) and not knowledge.startswith(HF_PREFIX) \
            and not Path(knowledge).expanduser().is_file() and knowledge not in BUILTIN_SETS:
        raise ValueError(f"--edits.knowledge {knowledge}: no such file, and not a built-in knowledge set "
                         f"(built-in: {', '.join(BUILTIN_SETS)})")
    source = str((config.data.task or Namespace(source="builtin")).source)  # no task: the built-in text task
    if source != "builtin" and not source.startswith(HF_PREFIX) and not Path(source).expanduser().is_file():
        raise ValueError(f"--data.task.source {source}: no such file (use 'builtin' for the built-in default or "
                         f"'{HF_PREFIX}<dataset id>' for a Hugging Face dataset)")


PRINT_CONFIG_FLAGS = re.compile(r"^(comments|skip_null|skip_default)(,(comments|skip_null|skip_default))*$")


def without_print_config(args: list[str]) -> list[str]:
    """``args`` without ``--print_config`` (``--print_config=FLAGS``, or ``--print_config`` and its flags)."""
    out: list[str] = []
    skip_flags = False
    for arg in args:
        if skip_flags and PRINT_CONFIG_FLAGS.match(arg):
            skip_flags = False
            continue
        skip_flags = arg == "--print_config"
        if not arg.startswith("--print_config"):
            out.append(arg)
    return out


class FitCLI(LightningCLI):
    """LightningCLI for :class:`FineTuneModule` on a :class:`TaskDataModule`, with run folders and a summary."""

    def __init__(self, args: list[str], parse_only: bool = False, started: threading.Event | None = None):
        """Parse ``args`` and run ``fit``; with ``parse_only``, parse and build the model, data and pipeline
        objects (whose constructors check their options) without a trainer, a model load or a run folder.
        ``started`` is set when the work begins (validation before training, then ``trainer.fit``)."""
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        # LightningCLI warns when args are given and sys.argv also holds arguments (`retention fit ...`, or a
        # study resolving its runs): the args are what counts.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
        # The run folder is managed here (refused, emptied or resumed); the CSV logger's notice about it is noise.
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        self.fit_seconds = 0.0
        self.parse_only = parse_only
        self.started = started or threading.Event()
        self.restore_from: Path | None = None
        """What a resume restores: the checkpoint file, or the checked private copy of a sharded folder."""
        self.lock: FileLock | None = None
        """The run folder's lock (on global rank 0), held from the folder's preparation to the run's end."""
        self.fresh_folder: Path | None = None
        """The run folder, when this run (on global rank 0) made it afresh rather than resuming it."""
        args = expand_config_includes(args)
        try:
            super().__init__(
                FineTuneModule, TaskDataModule, subclass_mode_model=False, subclass_mode_data=False,
                trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0, save_config_callback=RunConfig,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False, args=args if parse_only else ["fit", *args],
                run=not parse_only,
                # No abbreviated flags: --trainer.max_step would set trainer.max_steps silently. A parse error is
                # raised, not printed under the full usage: `retention fit` prints it as one line.
                parser_kwargs={"allow_abbrev": False, "exit_on_error": False,
                               "fit": {"allow_abbrev": False, "exit_on_error": False}},
            )
        except BaseException:
            self.forget_failed_start()
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def forget_failed_start(self) -> None:
        """Delete the folder of a fresh run that failed before its first optimizer step: it holds no results,
        and left behind it would block the corrected rerun ("run folder exists")."""
        trainer = getattr(self, "trainer", None)
        if self.fresh_folder is not None and (trainer is None or trainer.global_step == 0):
            shutil.rmtree(self.fresh_folder, ignore_errors=True)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningCLI.subcommands()["fit"]}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunArgs, "run")
        parser.link_arguments("model.model_name", "data.tokenizer")
        # Any torch optimizer and scheduler (--optimizer SGD --optimizer.lr 0.01); unset, FineTuneModule's AdamW
        # and warmup schedule (model.optimizer) train.
        parser.add_optimizer_args((torch.optim.Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        # The retention pipeline (edits, paraphrases, freeze, monitor, report): idle until edits are asked for.
        for key, callback in PIPELINE.items():
            parser.add_lightning_class_args(callback, key)

    @property
    def fit_config(self) -> Namespace:
        """The parsed ``fit`` configuration."""
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def fit_init(self) -> Namespace:
        """The ``fit`` configuration with its classes instantiated."""
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def resolved_config(self) -> dict[str, Any]:
        """The parsed ``fit`` configuration as plain YAML values (unset ``--optimizer``/``--lr_scheduler`` and
        remedy groups that do nothing left out)."""
        config = yaml.safe_load(self._parser(self.subcommand).dump(self.fit_config, skip_none=False))
        for (group, key), default in LEFT_OUT_AT_DEFAULT.items():
            if str(config.get(group, {}).get(key)) == str(default):
                del config[group][key]
        return {k: v for k, v in config.items()
                if not (k in UNSET_WHEN_NONE and v is None) and not (k in OFF_REMEDIES and OFF_REMEDIES[k](v or {}))}

    @override
    def instantiate_classes(self) -> None:
        if self.parse_only:
            self.config_init = self.parser.instantiate_classes(self.config)
            self.check_pipeline()
            return
        super().instantiate_classes()

    def check_pipeline(self) -> None:
        """Check what needs no model weights before any is loaded: the editor's hyperparameters, and every option
        that names layers against the model's config (editor layers, ``freeze.layers``, adapter layers)."""
        init = self.fit_init
        model_name = self.fit_config.model.model_name
        named = {"edits.hparams layers": init["edits"].editor_layers(model_name),
                 "freeze.layers": init["freeze"].layers,
                 "model.adapter.target_layers": self.fit_config.model.adapter.target_layers}
        if init["freeze"].policy in NEEDS_EDITS and not init["edits"].active:
            raise ValueError(f"freeze.policy {init['freeze'].policy} freezes by the edited layers, but "
                             "nothing is edited (edits.n_edit and edits.n_control are 0)")
        if init["rehearsal"].rate > 0 and not init["edits"].active:
            raise ValueError("--rehearsal.rate: nothing to rehearse (edits.n_edit and edits.n_control are 0)")
        if init["anchor"].active and init["anchor"].layers != "all" and not init["edits"].active:
            raise ValueError(f"--anchor.layers {init['anchor'].layers}: nothing is edited "
                             "(edits.n_edit and edits.n_control are 0)")
        n = model_num_layers(model_name)
        for flag, layers in named.items():
            bad = out_of_range(layers or [], n) if n is not None else []
            if bad:
                raise ValueError(f"{flag}: {bad} out of range for {model_name} ({n} layers)")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        printing = without_print_config(args)
        if printing != args:  # --print_config prints and exits inside the parse: check before it
            self._check_choices(parser.parse_args(printing))
        super().parse_arguments(parser, args)
        self._check_choices(self.config)

    @staticmethod
    def _check_choices(config: Namespace) -> None:
        subcommand = config.get("subcommand")
        check_choices(config[subcommand] if subcommand else config)

    @override
    def before_instantiate_classes(self) -> None:
        trainer = self.fit_config.trainer
        if trainer.precision is None:
            gpu = trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
            trainer.precision = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
        elif "bf16" in str(trainer.precision) and trainer.accelerator in ("auto", "cpu") and not torch.cuda.is_available():
            from retention.scoring import bf16_supported

            if not bf16_supported("cpu"):
                logging.getLogger(__name__).warning(
                    "--trainer.precision %s on a CPU without AVX-512 BF16 or AMX (%s): bfloat16 is emulated there "
                    "and slower than float32 (docs/finetuning.md#bf16-on-cpu)", trainer.precision,
                    torch.backends.cpu.get_cpu_capability())

    @property
    def run_args(self) -> RunArgs:
        return self.fit_init.run

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    @property
    def ckpt_path(self) -> str | None:
        return self.fit_init.get("ckpt_path")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        self.check_pipeline()
        check_sources(self.fit_config)
        run = self.run_args
        name = run.name or default_run_name(self.datamodule, self.model)
        if Path(name).is_absolute() or len(Path(name).parts) != 1 or name in (".", ".."):
            raise ValueError(f"run.name {name!r} must be a plain folder name inside run.out_dir (no '/', no '..'); "
                             "set run.out_dir for another place")
        run_dir = Path(run.out_dir) / name
        identity = RunIdentity(flatten(self.resolved_config()), RESUME_FREE_KEYS)
        custom = {key: self.fit_init.get(key) for key in UNSET_WHEN_NONE}
        self.model.optimizer_init, self.model.lr_scheduler_init = (
            None if v is None else v.as_dict() for v in custom.values())
        kept_rows: list[dict] = []
        checkpoint = None
        if self.ckpt_path is not None:
            if self.fit_init.get("weights_only") is False:
                raise ValueError("--weights_only false: retention fit loads checkpoints as tensors and plain "
                                 "values only, never running code from them")
            if any(v is not None for v in custom.values()):
                raise ValueError("--ckpt_path with --optimizer or --lr_scheduler: a resume restores only "
                                 "FineTuneModule's own AdamW and schedule (model.optimizer)")
            path, self.restore_from, checkpoint = resume_point(run_dir, self.ckpt_path)
            check_resume(path, checkpoint, identity, run.resume_changes or [])
            self.fit_init.ckpt_path = str(path)
        if launched_as_rank_zero():
            self.lock = prepare_run_folder(run_dir, run.overwrite, resume=checkpoint is not None)
            if checkpoint is not None:
                kept_rows = rewind_run_folder(run_dir, checkpoint["global_step"])
            else:
                self.fresh_folder = run_dir
        trainer_config = self.fit_init.trainer
        user_loggers = trainer_config.get("logger")
        loggers = run_loggers(run_dir, name, run.wandb, run.group, run.tags)
        for row in kept_rows:
            loggers[0].log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        if isinstance(user_loggers, Logger):
            loggers.append(user_loggers)
        elif isinstance(user_loggers, list):
            loggers += user_loggers
        callbacks = [*(trainer_config.get("callbacks") or []), identity]
        if run.checkpoint_every and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(LastCheckpoint(run_dir / "checkpoints", run.checkpoint_every))
            kwargs["enable_checkpointing"] = True
        if _RICH_AVAILABLE and trainer_config.get("enable_progress_bar") is not False \
                and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())  # Lightning's default, with a step-bounded run's description
        return super().instantiate_trainer(logger=loggers, default_root_dir=str(run_dir), callbacks=callbacks,
                                           **kwargs)

    def before_fit(self) -> None:
        self.started.set()
        # A resumed run has its validation history from the checkpoint; validating now would measure the model
        # before its trained weights are restored.
        if self.run_args.validate_first and self.ckpt_path is None:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if self.ckpt_path is not None:
            # Set on the trainer rather than passed to fit, so the callbacks know from the start that this run
            # resumes (the monitor does not log t=0 twice); unset after fit, or validate() would load it again.
            self.trainer.ckpt_path = str(self.restore_from)
            self.fit_init.ckpt_path = None
        self.fit_seconds = -time.perf_counter()

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``, restoring a checkpoint as :func:`load_checkpoint` reads one: tensors and plain
        values only."""
        self.trainer.fit(**{**kwargs, "weights_only": True})

    def after_fit(self) -> None:
        self.fit_seconds += time.perf_counter()
        self.trainer.ckpt_path = None
        module, trainer = self.model, self.trainer
        last = module.validations[-1]["step"] if module.validations else None
        if last != trainer.global_step:
            trainer.validate(module, datamodule=self.datamodule, verbose=False)
        if self.run_args.save_model:
            module.export(self.run_dir / "model")  # on every rank: a sharded model is gathered first
        if trainer.is_global_zero:
            print(fit_summary(module, trainer, self.datamodule, self.fit_seconds, self.run_dir))
            checkpoint = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
            if checkpoint is not None and not self.run_args.keep_checkpoint:
                shutil.rmtree(checkpoint.dirpath, ignore_errors=True)
            finish_run_folder(self.run_dir)  # last: the folder is now a finished run


def fit(argv: list[str], started: threading.Event | None = None) -> None:
    """Run ``retention fit ARGV``; raises on any error (``started`` tells whether the work had begun)."""
    # Progress lines of selection, editing and key statistics (Lightning keeps its own handler).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    FitCLI(argv, started=started)


def resolve_config(argv: list[str]) -> dict[str, Any]:
    """The fully resolved ``fit`` configuration of ``argv`` as a plain dict, checked as far as it can be without
    loading a model (``retention study --dry_run``); raises on a bad option."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # "Seed set to N" once per resolved run is noise here
    try:
        cli = FitCLI(argv, parse_only=True)
    finally:
        seed_log.setLevel(level)
    return cli.resolved_config()
