"""What a ``retention fit`` run records and shows besides its callbacks: the loggers (CSV, and W&B with its folders
inside the run folder), the resolved ``config.yaml`` logged as the run's hyperparameters, the progress bar and the
closing summary."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from typing_extensions import override

from retention.callbacks.checkpoint import RunIdentity
from retention.io import atomic_write_text


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
    """Lightning's rich progress bar, whose training task reads ``Epoch 0`` rather than ``Epoch 0/-2`` when
    training is bounded by steps (``max_epochs`` -1: no epoch limit), and ``Epoch 0/2`` with 3 epochs."""

    def epoch_description(self, epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        description = f"Epoch {epoch}" + (f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else "")
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def _describe_training(self) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            description = self.epoch_description(self.trainer.current_epoch)
            style = self.theme.description
            self.progress.update(self.train_progress_bar_id,
                                 description=f"[{style}]{description}" if style else description)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._describe_training()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        created = self.train_progress_bar_id is None  # the bar of a run resumed mid-epoch starts here
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if created:
            self._describe_training()


def fit_summary(module: Any, trainer: Trainer, datamodule: Any, seconds: float, run_dir: Path) -> str:
    """The run in a few lines: what was trained, how fast, validation before/after, and a warning when the
    validation loss says fine-tuning collapsed the model (``module`` a FineTuneModule, ``datamodule`` a
    TaskDataModule)."""
    from retention.callbacks.report import collapse_reason
    from retention.summary import collapse_warning

    task = datamodule.task_config
    tokens_per_s = module.train_tokens / seconds if seconds > 0 else float("nan")
    lines = [
        f"fit: {module.model_name} ({module.adapter.method}) on {task.family} from {task.source}: "
        f"{trainer.global_step} steps, {module.train_tokens} trained tokens in {seconds:.1f} s "
        f"({tokens_per_s:.0f} tokens/s per rank, validation included)"
    ]
    rows = module.validations
    if rows:
        names = [k for k in rows[-1] if k != "step"]
        lines.append("  " + f"{'step':>6}" + "".join(f"{n:>16}" for n in names))
        for row in rows if len(rows) <= 6 else rows[:1] + rows[-5:]:
            cells = "".join(f"{row[n]:>16.4f}" if n in row else f"{'-':>16}" for n in names)
            lines.append("  " + f"{row['step']:>6}" + cells)
        reason = collapse_reason(module)
        if reason is not None:
            lines.append(collapse_warning(reason))
    else:
        lines.append("  no validation data (task.val_fraction is 0)")
    lines.append(f"run folder: {run_dir}")
    return "\n".join(lines)
