"""AnchorEdits: a penalty pulling the anchored layers' weights toward their values at the start of fine-tuning.

The penalty is ``strength / 2 * sum_i w_i (theta_i - theta*_i)^2`` over the trainable parameters of the anchored
decoder layers, with ``theta*`` their values when training starts (after editing: the edited weights) and

- ``l2``: ``w_i = 1``;
- ``ewc``: ``w_i`` the diagonal of the empirical Fisher of the edits (elastic weight consolidation,
  Kirkpatrick et al. 2017, arXiv 1612.00796): the mean, over the edited facts' rewrite prompts, of the squared
  gradient of the log-probability of ``target_new`` (teacher-forced, tokenised as :mod:`retention.tokens`
  does), divided by its mean over the anchored parameters. That normalisation makes the mean weight 1 as in
  ``l2``, so one ``strength`` means a comparable pull in both.

The gradient ``strength * w * (theta - theta*)`` is added to each parameter's ``.grad`` after the backward pass
(``on_after_backward``, divided by ``trainer.accumulate_grad_batches`` as the loss is), so gradient clipping
and the optimizer see it as part of the loss gradient; with AdamW it is therefore an L2 pull through Adam's
normalisation, not a decoupled decay. Under DDP every rank holds the same weights and adds the same term.
Sharded strategies (FSDP, FSDP2) are refused.

With LoRA/DoRA the anchored parameters are the trainable adapter parameters of the anchored layers, pulled
toward their initial values (the frozen base weights never move); frozen parameters are skipped. The anchors
(and for ``ewc`` the weights) are float32 copies on each parameter's device: one or two extra copies of the
anchored parameters, kept in the checkpoint so a resumed run pulls toward the same values. ``train/anchor_penalty``
logs the penalty before each optimizer step.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from retention.arch import ArchAdapter
from retention.callbacks.freeze import frozen_layers
from retention.pipeline_contract import PipelineCallback
from retention.tokens import prompt_ids, target_ids

Method = Literal["none", "l2", "ewc"]
METHODS = ("none", "l2", "ewc")
Layers = Literal["edited", "window", "all"]
LAYERS = ("edited", "window", "all")


def anchored_parameters(model: nn.Module, layers: set[int]) -> dict[str, nn.Parameter]:
    """The trainable parameters of decoder ``layers``, by name inside the model."""
    arch = ArchAdapter.for_model(model)
    return {f"{arch.layer_name(i)}.{name}": p for i in sorted(layers)
            for name, p in arch.layer(i).named_parameters() if p.requires_grad}


def fisher_diagonal(model: nn.Module, tokenizer, pairs: list[tuple[str, str]],
                    params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The empirical Fisher's diagonal over ``params``: the mean over ``(prompt, target)`` pairs of the squared
    gradient of ``log p(" " + target | prompt)`` (float32; one forward and backward per pair)."""
    device = next(model.parameters()).device
    names, tensors = list(params), list(params.values())
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    for prompt, target in pairs:
        p_ids, t_ids = prompt_ids(tokenizer, prompt), target_ids(tokenizer, target)
        ids = torch.tensor([p_ids + t_ids], device=device)
        logits = model(input_ids=ids).logits[0, len(p_ids) - 1: -1].float()
        log_prob = -F.cross_entropy(logits, ids[0, len(p_ids):], reduction="sum")
        # autograd.grad leaves .grad alone (and a DDP reducer's hooks with it).
        grads = torch.autograd.grad(log_prob, tensors, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f += g.float() ** 2
    return {n: f / max(1, len(pairs)) for n, f in zip(names, fisher)}


def normalised(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Fisher divided by its mean over every anchored entry (mean weight 1, as ``l2``'s)."""
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    if total <= 0:
        raise ValueError("--anchor.method ewc: the Fisher of the edit prompts is zero on every anchored parameter "
                         "(the anchored layers do not affect the edits); anchor other layers (--anchor.layers)")
    mean = total / count
    return {n: f / mean for n, f in fisher.items()}


class AnchorEdits(PipelineCallback):
    """Adds the gradient of an L2 or EWC penalty toward the start-of-training weights (see the module
    docstring)."""

    runs_after = ("ApplyEdits",)

    def __init__(self, method: Method = "none", strength: float = 0.0, layers: Layers = "edited", window: int = 1):
        """
        Args:
            method: none, l2 (every weight counts alike) or ewc (weighted by the edits' Fisher diagonal,
                normalised to mean 1).
            strength: lambda of the penalty ``lambda / 2 * sum w (theta - theta*)^2`` (0: off).
            layers: the decoder layers anchored: ``edited`` (the layers the edits changed), ``window`` (within
                ``window`` of an edited layer) or ``all``.
            window: half-width of ``layers: window``.
        """
        if method not in METHODS:
            raise ValueError(f"--anchor.method={method!r}: unknown; choose from {', '.join(METHODS)}")
        if not (isinstance(strength, (int, float)) and strength >= 0 and strength != float("inf")):
            raise ValueError(f"--anchor.strength={strength}: must be a finite number >= 0")
        if layers not in LAYERS:
            raise ValueError(f"--anchor.layers={layers!r}: unknown; choose from {', '.join(LAYERS)}")
        if window < 0:
            raise ValueError(f"--anchor.window={window}: must be >= 0")
        self.method, self.strength, self.layers, self.window = method, float(strength), layers, window
        self.params: dict[str, nn.Parameter] = {}
        self.anchors: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        """Per-entry weights w (``ewc`` only; ``l2`` weighs every entry 1)."""
        self.penalty = 0.0

    @property
    def active(self) -> bool:
        return self.method != "none" and self.strength > 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.active and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(f"--anchor.method {self.method}: anchoring is not supported under sharded strategies "
                             f"({type(trainer.strategy).__name__}); use DDP or one device")

    def anchored_layers(self, pl_module: LightningModule) -> set[int]:
        arch = ArchAdapter.for_model(pl_module.model)
        if self.layers == "all":
            return set(range(arch.num_layers))
        edited = list(pl_module.pipeline.edited_layers)
        if not edited:
            raise ValueError(f"--anchor.layers {self.layers}: no layer was edited (set edits.n_edit, or anchor "
                             "--anchor.layers all)")
        return frozen_layers(self.layers, arch.num_layers, edited, self.window)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active:
            return
        self.params = anchored_parameters(pl_module.model, self.anchored_layers(pl_module))
        if not self.params:
            raise ValueError(f"--anchor.layers {self.layers}: the anchored layers have no trainable parameter")
        if self.anchors:  # restored from a checkpoint (load_state_dict)
            missing = set(self.params) ^ set(self.anchors)
            if missing:
                raise ValueError(f"the checkpoint's anchors do not match the anchored parameters ({sorted(missing)[:3]})")
        else:
            self.anchors = {n: p.detach().float().clone() for n, p in self.params.items()}
            if self.method == "ewc":
                self.weights = normalised(self.fisher(pl_module))
        self.anchors = {n: a.to(self.params[n].device) for n, a in self.anchors.items()}
        self.weights = {n: w.to(self.params[n].device) for n, w in self.weights.items()}
        n = sum(a.numel() for a in self.anchors.values())
        rank_zero_info(f"anchor ({self.method}, strength {self.strength}): {n} weights in {len(self.anchors)} tensors")

    def fisher(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        sets = pl_module.pipeline.sets
        pairs = [(r.rewrite_prompt, r.target_new) for r in (sets.edit if sets is not None else [])]
        if not pairs:
            raise ValueError("--anchor.method ewc: the Fisher is estimated on the edit prompts, and nothing was edited")
        model = pl_module.model
        training = model.training
        model.eval()  # no adapter dropout in the estimate
        try:
            return fisher_diagonal(model, pl_module.tokenizer, pairs, self.params)
        finally:
            model.train(training)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active:
            return
        scale = self.strength / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-mixed: the loss gradient is still scaled here
            scale *= scaler.get_scale()
        penalty = 0.0
        with torch.no_grad():
            for name, p in self.params.items():
                diff = p.detach().float() - self.anchors[name]
                weighted = diff * self.weights[name] if self.weights else diff
                penalty += float((weighted * diff).sum())
                grad = (scale * weighted).to(p.dtype)
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad += grad
        self.penalty = self.strength / 2 * penalty
        pl_module.log("train/anchor_penalty", self.penalty)

    @override
    def state_dict(self) -> dict:
        if not self.active:
            return {}
        return {"anchors": {n: a.cpu() for n, a in self.anchors.items()},
                "weights": {n: w.cpu() for n, w in self.weights.items()}}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        if self.active and state_dict:
            self.anchors, self.weights = dict(state_dict["anchors"]), dict(state_dict["weights"])
