"""``retention fit``: fine-tune a model on a downstream task with LightningCLI and report validation numbers.

With a model, a task and no edits it fine-tunes and reports; the retention pipeline plugs in through
``trainer.callbacks`` in YAML (edits, freezing, retention monitoring, the run report). Examples::

    retention fit --config configs/fit/instruct_alpaca.yaml
    retention fit --config configs/fit/text_builtin.yaml --config configs/trainer/ddp_cpu.yaml
    retention fit --config configs/fit/math_builtin.yaml --trainer.max_steps 5 --print_config

Every run writes into ``<run.out_dir>/<run.name>/``: the resolved ``config.yaml``, the CSV logger's
``metrics.csv`` and ``hparams.yaml``, W&B files (offline unless credentials exist) and, with
``run.save_model``, the merged fine-tuned model under ``model/``. A run never mixes with another: it holds
the folder's lock (``.lock``) while it runs, an existing folder is refused unless ``run.overwrite`` (which
empties it first, and only a run folder) or ``--ckpt_path`` (which resumes it), and ``incomplete.json`` marks
the folder until the run has finished. ``checkpoints/last.ckpt`` is rewritten every ``run.checkpoint_every``
steps; ``--ckpt_path last`` resumes an interrupted run to the same results as an uninterrupted one (weights,
data position, token counts, curves, ``metrics.csv`` rows). A resume is the run that wrote the checkpoint:
another config or data is refused unless ``run.resume_changes`` names the keys. Checkpoints are read as
tensors and plain values only.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from filelock import FileLock
from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from typing_extensions import override

from retention.arch import out_of_range
from retention.callbacks import PIPELINE
from retention.callbacks.checkpoint import (
    LAST,
    RUN_KEY,
    CheckpointError,
    LastCheckpoint,
    RunIdentity,
    flatten,
    load_checkpoint,
)
from retention.callbacks.freeze import NEEDS_EDITS
from retention.data.datamodule import TaskDataModule
from retention.io import LOCK, atomic_write_json, atomic_write_text, empty_folder, lock_folder
from retention.models import model_num_layers
from retention.modules.finetune import FineTuneModule
from retention.summary import INCOMPLETE

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


RUN_MARKERS = (INCOMPLETE, "config.yaml", "summary.json")
"""Files a run writes into its folder; ``run.overwrite`` deletes only a folder that holds one."""


def prepare_run_folder(run_dir: Path, overwrite: bool, resume: bool) -> FileLock:
    """Make ``run_dir`` this run's own: refuse an existing one unless ``overwrite`` (emptied; only a run
    folder) or ``resume``, and one another run is using; mark it incomplete until the run finishes. Returns
    the folder's lock, which the caller holds until the run ends."""
    existing = run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir())
    if existing and not resume:
        if not overwrite:
            raise FileExistsError(
                f"run folder {run_dir} exists: choose another run.name, replace it with run.overwrite true, or "
                "resume it with --ckpt_path last"
            )
        if not any((run_dir / name).exists() for name in RUN_MARKERS):
            raise FileExistsError(f"run.overwrite: {run_dir} is not a run folder (it holds none of "
                                  f"{', '.join(RUN_MARKERS)}), and only run folders are replaced: choose "
                                  "another run.name or run.out_dir")
    lock = lock_folder(run_dir, "run")
    try:
        if existing and not resume:
            empty_folder(run_dir, keep=(LOCK,))
        atomic_write_json(run_dir / INCOMPLETE, {
            "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "this run has not finished; its files may be partial (resume it with --ckpt_path last)",
        })
    except BaseException:
        lock.release()
        raise
    return lock


def launched_as_rank_zero(env: dict[str, str] | None = None) -> bool:
    """Whether this process is global rank 0, before a trainer knows: every rank variable a launcher sets is 0.
    ``RANK`` (torchrun), ``SLURM_PROCID`` (srun) and ``LOCAL_RANK`` (Lightning's launcher, for the processes it
    starts) are not enough: with Lightning's launcher on several nodes the process each node starts by hand
    has only ``NODE_RANK``."""
    env = os.environ if env is None else env
    return all(int(env.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"))


def resume_point(run_dir: Path, ckpt_path: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--ckpt_path`` names (``last``: this run's ``checkpoints/last.ckpt``) and its content,
    read without running code (a sharded checkpoint's folder: its ``meta.pt``, everything but the weights)."""
    path = run_dir / "checkpoints" / LAST if ckpt_path == "last" else Path(ckpt_path)
    if not (path.is_file() or (path / "meta.pt").is_file()):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no checkpoint at {path}")
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.get("global_step"), int):
        raise CheckpointError(f"{path}: not a checkpoint of retention fit (no integer global_step)")
    return path, checkpoint


RESUME_FREE_KEYS = ("config", "ckpt_path", "weights_only", "run.overwrite", "run.wandb",
                    "run.keep_checkpoint", "run.resume_changes", "trainer.enable_progress_bar")
"""Resolved keys a resume may change freely: how a run is started, shown and kept, not what it computes."""


def check_resume(path: Path, checkpoint: dict[str, Any], identity: RunIdentity, allowed: list[str]) -> None:
    """Refuse to resume from ``checkpoint`` (read from ``path``) with a config or data that differs from the
    run that wrote it, in keys other than ``allowed``; record the allowed changes in ``identity``."""
    stored = checkpoint.get(RUN_KEY)
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: records no config (written before retention checked resumes, or "
                              "not by retention fit), so this resume cannot be shown to be the same run: "
                              "start the run again, or resume it anyway with --run.resume_changes '[\"*\"]'")
    differences = identity.differences(stored)
    known = set(identity.config) | set(stored.get("config", {}))
    unknown = [k for k in allowed if k != "*" and k not in known]
    if unknown:
        raise ValueError(f"run.resume_changes: {unknown} are not keys of the resolved config (dotted keys, "
                         "e.g. model.optimizer.lr; --print_config shows them)")
    refused = [k for k in differences if "*" not in allowed and k not in allowed]
    if refused:
        lines = "".join(f"  {k}: {differences[k][0]!r} in the checkpoint, {differences[k][1]!r} now\n"
                        for k in refused)
        raise CheckpointError(
            f"{path}: this resume is not the run that wrote the checkpoint; its config differs in:\n{lines}"
            "resume with the checkpoint's values, or allow the change with "
            f"--run.resume_changes '[{','.join(refused)}]' (config.yaml then records both values)")
    step = checkpoint["global_step"]
    identity.changes = [*stored.get("changes", []), *({"step": step, "key": k, "before": b, "after": a}
                                                      for k, (b, a) in differences.items())]


def rewind_run_folder(run_dir: Path, step: int) -> list[dict]:
    """Forget what an interrupted run wrote after its checkpoint's ``step``: per-probe files of later
    measurements are deleted; returns the ``metrics.csv`` rows up to ``step`` (the CSV logger starts the file
    afresh; they are logged again ahead of the resumed run's rows)."""
    for path in (run_dir / "probes").glob("step_*.jsonl"):
        if int(path.stem.removeprefix("step_")) > step:
            path.unlink()
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return []
    with open(metrics, newline="", encoding="utf-8") as f:
        rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if int(row.get("step", 0)) <= step]


def default_run_name(data: TaskDataModule, model: FineTuneModule) -> str:
    task = data.task_config
    source = Path(task.source).stem if task.source != "builtin" else "builtin"
    return re.sub(r"[^\w.-]+", "_", f"{task.family}-{source}-{model.adapter.method}")


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def run_loggers(run_dir: Path, name: str, wandb: str, group: str | None = None,
                tags: list[str] | None = None) -> list[Logger]:
    """A CSV logger writing into the run folder, and W&B (its folders inside the run folder) unless disabled."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if wandb != "disabled":
        for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
            os.environ[var] = str(run_dir)
        online = wandb == "online" or (wandb == "auto" and wandb_has_credentials())
        loggers.append(WandbLogger(name=name, save_dir=str(run_dir), project="retention", offline=not online,
                                   group=group, tags=tags))
    return loggers


def _config_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """``--config`` values for a config file: its ``config:`` parents first (paths relative to the file; each
    parent's own parents before it), then the file's other keys as one YAML text."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: config files include each other ({' -> '.join(map(str, (*seen, path)))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or "config" not in data:
        return [str(path)]
    parents = data.pop("config")
    layers: list[str] = []
    for parent in parents if isinstance(parents, list) else [parents]:
        layers += _config_layers(path.parent / str(parent), (*seen, path))
    return [*layers, yaml.safe_dump(data, sort_keys=False)]


def expand_config_includes(argv: list[str]) -> list[str]:
    """``argv`` with every config file that names parents (``config: parent.yaml``) replaced by its layers.

    jsonargparse applies a group given as a mapping inside a file with parents (``run: {name: x}``) as the whole
    group, resetting the parent's other keys of that group to their defaults; as separate ``--config`` layers
    each key is merged over the parent's, as the dotted form (``run.name: x``) and consecutive ``--config`` files
    are."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, value = (arg, argv[i + 1] if i + 1 < len(argv) else None) if arg in ("-c", "--config") else (None, None)
        if arg.startswith("--config="):
            flag, value = "--config", arg.split("=", 1)[1]
        if flag is not None and value is not None and Path(value).is_file():
            for layer in _config_layers(Path(value)):
                out += ["--config", layer]
            i += 1 if arg.startswith("--config=") else 2
            continue
        out.append(arg)
        i += 1
    return out


class RunConfig(SaveConfigCallback):
    """Writes the resolved ``config.yaml`` into the run folder (as LightningCLI does) and logs the same
    configuration, every group (model, data, trainer, run, edits, paraphrases, freeze, monitor, report, ...), as
    hyperparameters to every logger: W&B's run config and the CSV logger's ``hparams.yaml`` hold the whole run,
    not only the model's settings (which the FineTuneModule logs next to it)."""

    @override
    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config.pop("config", None)  # the --config layers themselves; their content is in the groups
        identity = next((c for c in trainer.callbacks if isinstance(c, RunIdentity)), None)
        if identity is not None and identity.changes:
            config["resume_changes"] = identity.changes
            path = Path(trainer.log_dir) / self.config_filename
            notes = "".join(f"#   {c['key']}: {c['before']!r} up to step {c['step']}, then {c['after']!r}\n"
                            for c in identity.changes)
            atomic_write_text(path, path.read_text(encoding="utf-8") + "# Resumed with changes "
                              "(run.resume_changes); the values above ran after the last change:\n" + notes)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, whose description reads ``Epoch 0`` rather than ``Epoch 0/-2`` when
    training is bounded by steps (``max_epochs`` -1: no epoch limit), and ``Epoch 0/2`` with 3 epochs."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0
                                                  else "")
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"  # no flicker against "Validation"
        return description


class FitCLI(LightningCLI):
    """LightningCLI for :class:`FineTuneModule` on a :class:`TaskDataModule`, with run folders and a report."""

    def __init__(self, args: list[str], parse_only: bool = False):
        """Parse ``args`` and run ``fit``; with ``parse_only``, parse and build the model, data and pipeline
        objects (whose constructors check their options) without a trainer, a model load or a run folder."""
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        # LightningCLI warns when args are given and sys.argv also holds arguments (`retention fit ...`, or a
        # study resolving its runs): the args are what counts.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
        # The run folder is managed here (refused, emptied or resumed); the CSV logger's notice about it is noise.
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        self.fit_seconds = 0.0
        self.parse_only = parse_only
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
                # No abbreviated flags: --trainer.max_step would set trainer.max_steps silently.
                parser_kwargs={"allow_abbrev": False, **({"exit_on_error": False} if parse_only else {})},
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
        # The retention pipeline (edits, paraphrases, freeze, monitor, report): idle until edits are asked for.
        for key, callback in PIPELINE.items():
            parser.add_lightning_class_args(callback, key)

    @property
    def fit_config(self):
        """The parsed ``fit`` configuration (a jsonargparse Namespace)."""
        return self.config[self.subcommand] if self.subcommand else self.config

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
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        model_name = self.fit_config.model.model_name
        named = {"edits.hparams layers": init["edits"].editor_layers(model_name),
                 "freeze.layers": init["freeze"].layers,
                 "model.adapter.target_layers": self.fit_config.model.adapter.target_layers}
        if init["freeze"].policy in NEEDS_EDITS and not init["edits"].active:
            raise ValueError(f"freeze.policy {init['freeze'].policy} freezes by the edited layers, but "
                             "nothing is edited (edits.n_edit and edits.n_control are 0)")
        n = model_num_layers(model_name)
        for flag, layers in named.items():
            bad = out_of_range(layers or [], n) if n is not None else []
            if bad:
                raise ValueError(f"{flag}: {bad} out of range for {model_name} ({n} layers)")

    @override
    def before_instantiate_classes(self) -> None:
        trainer = self.fit_config.trainer
        if trainer.precision is None:
            gpu = trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
            trainer.precision = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"

    @property
    def run_args(self) -> RunArgs:
        return self.config_init[self.subcommand].run

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    @property
    def ckpt_path(self) -> str | None:
        return self.config_init[self.subcommand].get("ckpt_path")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        self.check_pipeline()
        run = self.run_args
        name = run.name or default_run_name(self.datamodule, self.model)
        if Path(name).is_absolute() or len(Path(name).parts) != 1 or name in (".", ".."):
            raise ValueError(f"run.name {name!r} must be a plain folder name inside run.out_dir (no '/', no '..'); "
                             "set run.out_dir for another place")
        run_dir = Path(run.out_dir) / name
        parser = self._parser(self.subcommand)
        identity = RunIdentity(flatten(yaml.safe_load(parser.dump(self.fit_config, skip_none=False))),
                               RESUME_FREE_KEYS)
        kept_rows: list[dict] = []
        checkpoint = None
        if self.ckpt_path is not None:
            if self.config_init[self.subcommand].get("weights_only") is False:
                raise ValueError("--weights_only false: retention fit loads checkpoints as tensors and plain "
                                 "values only, never running code from them")
            path, checkpoint = resume_point(run_dir, self.ckpt_path)
            check_resume(path, checkpoint, identity, run.resume_changes or [])
            self.config_init[self.subcommand].ckpt_path = str(path)
        if launched_as_rank_zero():
            self.lock = prepare_run_folder(run_dir, run.overwrite, resume=checkpoint is not None)
            if checkpoint is not None:
                kept_rows = rewind_run_folder(run_dir, checkpoint["global_step"])
            else:
                self.fresh_folder = run_dir
        trainer_config = self.config_init[self.subcommand].trainer
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
        # A resumed run has its validation history from the checkpoint; validating now would measure the model
        # before its trained weights are restored.
        if self.run_args.validate_first and self.ckpt_path is None:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if self.ckpt_path is not None:
            # Set on the trainer rather than passed to fit, so the callbacks know from the start that this run
            # resumes (the monitor does not log t=0 twice); unset after fit, or validate() would load it again.
            self.trainer.ckpt_path = self.ckpt_path
            self.config_init[self.subcommand].ckpt_path = None
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
            print(self.report())
            checkpoint = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
            if checkpoint is not None and not self.run_args.keep_checkpoint:
                shutil.rmtree(checkpoint.dirpath, ignore_errors=True)
            (self.run_dir / INCOMPLETE).unlink(missing_ok=True)  # last: the folder is now a finished run

    def report(self) -> str:
        """The run in a few lines: what was trained, how fast, validation before/after, and a warning when the
        validation loss says fine-tuning collapsed the model."""
        from retention.arch import unwrap_model
        from retention.summary import collapse, collapse_warning

        module, trainer, task = self.model, self.trainer, self.datamodule.task_config
        tokens_per_s = module.train_tokens / self.fit_seconds if self.fit_seconds > 0 else float("nan")
        lines = [
            f"fit: {module.model_name} ({module.adapter.method}) on {task.family} from {task.source}: "
            f"{trainer.global_step} steps, {module.train_tokens} trained tokens in {self.fit_seconds:.1f} s "
            f"({tokens_per_s:.0f} tokens/s per rank, validation included)"
        ]
        rows = module.validations
        if rows:
            names = [k for k in rows[-1] if k != "step"]
            lines.append("  " + f"{'step':>6}" + "".join(f"{n:>16}" for n in names))
            for row in rows if len(rows) <= 6 else rows[:1] + rows[-5:]:
                cells = "".join(f"{row[n]:>16.4f}" if n in row else f"{'-':>16}" for n in names)
                lines.append("  " + f"{row['step']:>6}" + cells)
            reason = collapse(rows, unwrap_model(module.model).get_output_embeddings().weight.shape[0])
            if reason is not None:
                lines.append(collapse_warning(reason))
        else:
            lines.append("  no validation data (task.val_fraction is 0)")
        lines.append(f"run folder: {self.run_dir}")
        return "\n".join(lines)


def main(argv: list[str]) -> int:
    # Progress lines of selection, editing and key statistics (Lightning keeps its own handler).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    FitCLI(argv)
    return 0


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
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
