"""FreezeLayers: choose the decoder layers that fine-tuning must not change.

Policies (``L`` = the edited layers, which ApplyEdits writes to the module's ``pipeline.edited_layers``):

- ``none``: nothing frozen.
- ``edited``: freeze L (Wen & Zhang 2025, arXiv 2507.14198).
- ``window``: freeze every layer within ±``window`` of a layer in L.
- ``upto``: freeze every layer up to and including the last edited one.
- ``only_edited``: the opposite arm (Cheng et al. 2025, arXiv 2511.05852): only L is trainable; every other
  layer is frozen and so are the embeddings, the final norm and the output head.
- ``list``: freeze the layers given in ``layers``.
- ``located``: freeze the layers ``retention locate`` found for the base model (causal tracing).

The callback adds its layers to ``pl_module.pipeline.frozen_layers``; the FineTuneModule then skips those layers when it adds
LoRA/DoRA adapters and turns off their gradients, before the strategy wraps the model. In ``setup`` it writes its
policy to ``pl_module.pipeline.freeze_policy`` (EditAfterFineTune's ``only_after`` checks it).
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from retention.arch import ArchAdapter
from retention.pipeline_contract import PipelineCallback

Policy = Literal["none", "edited", "window", "upto", "only_edited", "list", "located"]
POLICIES = ("none", "edited", "window", "upto", "only_edited", "list", "located")
NEEDS_EDITS = ("edited", "window", "upto", "only_edited")
"""The policies that freeze according to the edited layers."""


def frozen_layers(policy: str, num_layers: int, edited: list[int] | None = None, window: int = 1,
                  layers: list[int] | None = None) -> set[int]:
    """The layer indices a policy freezes in a model with ``num_layers`` decoder layers."""
    if policy not in POLICIES:
        raise ValueError(f"freeze policy {policy!r} unknown; choose from {', '.join(POLICIES)}")
    if policy == "none":
        return set()
    if policy in ("list", "located"):
        if layers is None:
            raise ValueError(f"freeze policy {policy!r} needs layers")
        bad = [i for i in layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"freeze layers {bad} out of range for a model with {num_layers} layers")
        return {i % num_layers for i in layers}
    if not edited:
        raise ValueError(
            f"freeze policy {policy!r} needs the edited layers, but none are known: put FreezeLayers after "
            "ApplyEdits in trainer.callbacks, and edit at least one fact"
        )
    if policy == "edited":
        return set(edited)
    if policy == "window":
        if window < 0:
            raise ValueError(f"freeze window={window}: must be >= 0")
        return {j for i in edited for j in range(max(0, i - window), min(num_layers, i + window + 1))}
    if policy == "upto":
        return set(range(max(edited) + 1))
    return set(range(num_layers)) - set(edited)


class FreezeLayers(PipelineCallback):
    """Freezes decoder layers during fine-tuning according to a policy (see the module docstring)."""

    runs_after = ("ApplyEdits",)

    def __init__(self, policy: Policy = "none", window: int = 1, layers: list[int] | None = None):
        """
        Args:
            policy: none, edited, window, upto, only_edited, list or located.
            window: half-width of the ``window`` policy (layers i-w..i+w around each edited layer).
            layers: the layers of the ``list`` policy.
        """
        if policy not in POLICIES:
            raise ValueError(f"freeze.policy={policy!r}: unknown; choose from {', '.join(POLICIES)}")
        if policy == "list" and not layers:
            raise ValueError("freeze.layers: policy 'list' needs layers, e.g. --freeze.layers '[3, 4, 5]'")
        if layers is not None and policy != "list":
            raise ValueError(f"freeze.layers={layers}: layers are given only with freeze.policy 'list' "
                             f"(it is {policy!r})")
        if window < 0:
            raise ValueError(f"freeze.window={window}: must be >= 0")
        self.policy = policy
        self.window = window
        self.layers = layers
        self._located: list[int] | None = None
        self.frozen: set[int] = set()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.pipeline.freeze_policy = self.policy

    def _locate(self, pl_module: LightningModule) -> None:
        if self.policy == "located" and self._located is None:
            from retention.editing.causal_trace import located_layers

            self._located = located_layers(pl_module.model)

    @override
    def on_before_edits(self, trainer: Trainer, pl_module: LightningModule, records: list) -> None:
        # Called by ApplyEdits while the model is still the base model: located layers are keyed by its weights.
        self._locate(pl_module)

    @override
    def on_base_model_ready(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._locate(pl_module)
        arch = ArchAdapter.for_model(pl_module.model)
        layers = self._located if self.policy == "located" else self.layers
        state = pl_module.pipeline
        self.frozen = frozen_layers(self.policy, arch.num_layers, list(state.edited_layers), self.window, layers)
        state.frozen_layers |= self.frozen
        if self.policy == "only_edited":
            for module in (arch.embed, arch.final_norm, arch.lm_head):
                module.requires_grad_(False)
        rank_zero_info(f"freeze policy {self.policy}: frozen layers {sorted(self.frozen) or 'none'} "
                       f"of {arch.num_layers} (edited {sorted(state.edited_layers) or 'none'})")
