"""The paper's stopping rule: fine-tune until the validation loss falls below a threshold.

Max steps and epochs are Trainer flags (``trainer.max_steps``, ``trainer.max_epochs``); whichever rule fires
first ends the run.
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

log = logging.getLogger(__name__)


class StopOnValLoss(Callback):
    """Stop training once the validation loss is below ``threshold``, checked every ``check_every_n_steps``
    training batches (optimizer steps, unless gradients are accumulated).

    The callback sets the Trainer's validation cadence to ``check_every_n_steps`` (``val_check_interval``, with
    ``check_val_every_n_epoch=None`` so checks may span epochs); a different ``val_check_interval`` set by hand
    is an error rather than being silently overridden.
    """

    def __init__(self, threshold: float, check_every_n_steps: int = 50, monitor: str = "val/loss"):
        """
        Args:
            threshold: Stop when the monitored value is strictly below this.
            check_every_n_steps: Validate and check every this many training batches.
            monitor: The logged metric to compare with the threshold.
        """
        if check_every_n_steps < 1:
            raise ValueError(f"StopOnValLoss.check_every_n_steps must be at least 1, got {check_every_n_steps}")
        self.threshold = threshold
        self.check_every_n_steps = check_every_n_steps
        self.monitor = monitor
        self.stopped_at_step: int | None = None
        """Global step at which the rule fired (None while it has not)."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        current = trainer.val_check_interval
        if current not in (1.0, self.check_every_n_steps):
            raise ValueError(
                f"StopOnValLoss(check_every_n_steps={self.check_every_n_steps}) sets the validation cadence, "
                f"but trainer.val_check_interval={current} was also given: drop one of them or make them equal"
            )
        trainer.val_check_interval = self.check_every_n_steps
        trainer.check_val_every_n_epoch = None

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"StopOnValLoss: metric {self.monitor!r} was not logged during validation "
                f"(logged: {', '.join(sorted(trainer.callback_metrics)) or 'nothing'})"
            )
        if float(value) < self.threshold:
            trainer.should_stop = True
            self.stopped_at_step = trainer.global_step
            log.info("%s %.4f < %g at step %d: stopping", self.monitor, float(value), self.threshold,
                     trainer.global_step)
