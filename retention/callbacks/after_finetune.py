"""EditAfterFineTune: make the run's edit on the fine-tuned weights, again or for the first time, and measure it.

``after.mode`` (config key ``after``):

- ``reedit``: the run edits before fine-tuning as usual. When training has ended (after the RetentionMonitor's last
  measurement) the same edit requests are edited again, with the same editor, resolved hyperparameters and mode,
  into the fine-tuned weights, and the probe sets are measured there against t=0. Does a re-edit land on the
  fine-tuned model, and what does it cost the neighbours and the control facts?
- ``only_after``: the ordering baseline. ApplyEdits selects the facts but edits nothing
  (``PipelineState.defer_edits``): t=0 is measured on the unedited model, fine-tuning starts from the base model,
  and the edit is made on the fine-tuned weights at the end.

The edit goes into a standalone copy of the fine-tuned model (``FineTuneModule.merged_model``: LoRA/DoRA adapters
merged into the weights; under DDP every rank copies and edits alike), so the model that validation and
``run.save_model`` see stays as trained. The editor's set-up (key covariances, context templates, located layers)
is the base model's: ApplyEdits sets the editor up on the base model before fine-tuning, and the edit after it
reads that set-up from the caches keyed by the base weights' fingerprint. Sharded weights (FSDP, FSDP2) are
refused: editors never see sharded tensors.

It reads only the module's :class:`~retention.pipeline_contract.PipelineState`: the edit to make again
(``edit_again``, from ApplyEdits), the probes, score settings and t=0 results (from the RetentionMonitor), the
freeze policy (from FreezeLayers). The result goes to the state too (``after``), and from there
to ``summary.json`` (``after_finetune``) and ``probes/after_finetune.jsonl``.
"""

from __future__ import annotations

import time
from typing import Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from retention.callbacks.freeze import NEEDS_EDITS
from retention.callbacks.probing import measure
from retention.pipeline_contract import AfterFineTune, PipelineCallback

Mode = Literal["none", "reedit", "only_after"]
MODES = ("none", "reedit", "only_after")


class EditAfterFineTune(PipelineCallback):
    """Edits the fine-tuned weights when training ends (the run's edit again, or its only edit) and measures the
    probe sets there against t=0 (see the module docstring)."""

    runs_after = ("ApplyEdits", "FreezeLayers", "RetentionMonitor")

    def __init__(self, mode: Mode = "none"):
        """
        Args:
            mode: ``none``; ``reedit`` (edit before fine-tuning as usual, and the same edit again after it); or
                ``only_after`` (no edit before fine-tuning: t=0 is the unedited model; edit after it).
        """
        if mode not in MODES:
            raise ValueError(f"after.mode={mode!r}: unknown; choose from {', '.join(MODES)}")
        self.mode = mode

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Before configure_model (which edits), for the validation before fit as for fit itself; after the setup
        # of FreezeLayers and RetentionMonitor, which write their policy and score settings to the state.
        if self.mode == "none":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(f"after.mode {self.mode}: the fine-tuned weights are sharded under "
                             f"{type(trainer.strategy).__name__}, and editors never see sharded tensors; use DDP "
                             "or one device, or set after.mode none")
        state = pl_module.pipeline
        if state.score_settings is None:
            raise ValueError(f"after.mode {self.mode} measures against the RetentionMonitor's t=0: add the monitor "
                             "(before EditAfterFineTune in trainer.callbacks)")
        if self.mode == "only_after" and state.freeze_policy in NEEDS_EDITS:
            raise ValueError(f"after.mode only_after edits nothing before fine-tuning, but freeze.policy "
                             f"{state.freeze_policy} freezes by the edited layers; use freeze.policy none, list or "
                             "located")
        state.edit_later = True
        state.defer_edits = self.mode == "only_after"

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode != "none" and pl_module.pipeline.edit_again is None:
            raise ValueError(f"after.mode {self.mode}: ApplyEdits set up no edit to make after fine-tuning; "
                             "add it with edits.n_edit > 0")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "none":
            return
        state = pl_module.pipeline
        t0 = time.perf_counter()
        model = pl_module.merged_model()
        applied = state.edit_again(model)
        edit_seconds = time.perf_counter() - t0
        m, _ = measure(model, pl_module.tokenizer, state.probes, state.score_settings, trainer.global_step,
                       state.baseline)
        del model
        state.after = AfterFineTune(self.mode, m, edit_seconds)
        if self.mode == "only_after":  # the run's only edit: the summary describes it as made
            state.edit.update(hparams=applied.hparams, edited_layers=list(applied.layers),
                              edit_diagnostics=applied.diagnostics)
        edit = m.rates["accuracy"].get("edit", {})
        rank_zero_info(f"after.mode {self.mode}: edited the fine-tuned model at step {m.step} in layers "
                       f"{applied.layers} ({edit_seconds:.1f} s); edit accuracy "
                       + ", ".join(f"{p} {r['value']:.2f} ({r['count']}/{r['denominator']})"
                                   for p, r in edit.items()))
