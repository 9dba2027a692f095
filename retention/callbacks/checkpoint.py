"""LastCheckpoint: one resumable checkpoint per run, rewritten every n optimizer steps, never half-written.

``retention fit`` adds it unless ``run.checkpoint_every`` is 0 or the config has its own ``ModelCheckpoint``. What
it holds (the light form): the trainable weights and the optimizer/scheduler state (``FineTuneModule``), the
training loader's position in its epoch (``ResumableLoader``), trained tokens, validation history and RNG
states (``FineTuneModule``), the monitor's curves (``RetentionMonitor``), and the edit and control sets with the
edited weights that are not trained (``ApplyEdits``). ``--ckpt_path last`` resumes from it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from weakref import proxy

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

LAST = "last.ckpt"


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimizer steps, written to a temporary name and
    renamed, so a kill while writing leaves the previous checkpoint intact.

    A strategy that saves a folder (FSDP2's sharded checkpoint: one file per rank and ``meta.pt``) writes
    ``last.ckpt.step<N>/``, and ``last.ckpt`` becomes a symbolic link to it, replaced in one rename; the folder
    it pointed to before is deleted afterwards."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int):
        super().__init__(dirpath=str(dirpath), save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / LAST

    @override
    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        partial = Path(f"{filepath}.step{trainer.global_step}")
        if partial.is_dir():  # a sharded checkpoint left by a run killed while writing this step
            if trainer.is_global_zero:
                shutil.rmtree(partial)
            trainer.strategy.barrier("LastCheckpoint.clean")
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            if partial.is_dir():
                self._link(Path(filepath), partial)
            else:
                os.replace(partial, filepath)
        trainer.strategy.barrier("LastCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _link(last: Path, folder: Path) -> None:
        """Point ``last`` at ``folder`` atomically, then delete the folder it pointed to before."""
        previous = last.resolve() if last.is_symlink() else None
        tmp = last.with_name(f".{last.name}.link{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder.name)
        os.replace(tmp, last)
        if previous is not None and previous != folder.resolve():
            shutil.rmtree(previous, ignore_errors=True)
