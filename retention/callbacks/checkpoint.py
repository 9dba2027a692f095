"""LastCheckpoint: one resumable checkpoint per run, rewritten every n optimizer steps, never half-written.

``retention fit`` adds it unless ``run.checkpoint_every`` is 0 or the config has its own ``ModelCheckpoint``. What
it holds (the light form): the trainable weights and the optimizer/scheduler state (``FineTuneModule``), the
training loader's position in its epoch (``ResumableLoader``), trained tokens, validation history and RNG
states (``FineTuneModule``), the monitor's curves (``RetentionMonitor``), and the edit and control sets with the
edited weights that are not trained (``ApplyEdits``). ``--ckpt_path last`` resumes from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from weakref import proxy

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

LAST = "last.ckpt"


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimizer steps, written to a temporary name and
    renamed, so a kill while writing leaves the previous checkpoint intact."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int):
        super().__init__(dirpath=str(dirpath), save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / LAST

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("LastCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
