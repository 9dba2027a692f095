"""ROME in its r-ROME form: a rank-one update of one MLP output projection per fact.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (ROME, arXiv 2202.05262); Gupta et al. 2024,
"Rebuilding ROME: Resolving Model Collapse during Sequential Model Editing" (r-ROME, arXiv 2403.07175).

For a fact with subject s at layer L, with W the projection as an ``[out, in]`` matrix:

- key: ``k̄`` = the projection's input at the subject's last token, averaged over the rewriting prompts (context
  templates × the prompt and its augmentation phrasings), read on the v* optimiser's first step;
- ``u = C⁻¹ k̄`` with C = E[k kᵀ] over a text corpus (:mod:`retention.editing.covariance`), or ``u = k̄`` when
  ``mom2_adjustment`` is off (the named C = I fallback);
- value: δ from :func:`retention.editing.targets.optimise_targets` (``v* = W k + b + δ`` on the plain prompt);
- update ``ΔW = δ uᵀ / (uᵀ k̄)``.

The denominator uses the same prefix-averaged key as ``u`` (r-ROME). The original implementation used the
unprefixed key there, which can make ``uᵀ k`` tiny and the update huge — the "disabling edits" that collapse a
model in sequential editing. The update math is float64, the stored delta float32 in the weight's own layout
(Linear ``[out, in]``, GPT-2 Conv1D ``[in, out]``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from retention.editing.base import (
    EditRequest,
    EditResult,
    RequestDiagnostics,
    check_finite,
)
from retention.editing.context import EditorContext
from retention.editing.covariance import KeyStatsHParams
from retention.editing.locate_then_edit import LocateThenEditEditor
from retention.editing.targets import TargetHParams, TargetVector, optimise_targets, refuse_zero_update

log = logging.getLogger(__name__)



@dataclass
class RomeHParams(TargetHParams, KeyStatsHParams):
    """ROME hyperparameters (names follow the ROME code where they exist)."""

    layer: int = 5
    """The edited layer (its MLP output projection)."""


class RomeEditor(LocateThenEditEditor):
    """r-ROME: one rank-one update of ``layer``'s MLP output projection per request, requests in turn."""

    name = "rome"
    hparams_class = RomeHParams
    hparams: RomeHParams

    def __init__(self, hparams: RomeHParams):
        super().__init__(hparams)
        self._cov_lu: tuple[torch.Tensor, torch.Tensor] | None = None
        """The LU factors of the layer's C (None: C = I)."""

    def layer_setting(self) -> list[int]:
        return [self.hparams.layer]

    def _set_up(self, ctx: EditorContext, fresh: bool) -> None:
        if fresh:
            (layer,) = ctx.layers
            self._cov_lu = torch.linalg.lu_factor(ctx.covs[layer]) if layer in ctx.covs else None

    def edit(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> EditResult:
        """Compute each request's update on the model edited by the previous ones; the model is restored after."""
        t0 = time.perf_counter()
        ctx = self.prepare(model, tokenizer)
        done: list[EditResult] = []
        try:
            for req in requests:
                result = self._edit_one(ctx, req)
                result.apply(ctx.model)
                done.append(result)
        finally:
            for result in reversed(done):
                result.revert(ctx.model)
        merged = EditResult.merge(done)
        merged.seconds = time.perf_counter() - t0
        return merged

    def edit_singles(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[EditResult]:
        """Each request's rank-one update on the model as it is, as :meth:`edit` of it alone computes it, but with
        their v* (and keys k̄, read on its first step) optimised together (one
        :func:`~retention.editing.targets.optimise_targets`: per request its own δ, Adam state, clamp and early
        stop; only float rounding from padding differs). A request's ``seconds``: an equal share of the shared
        work (keys, v*) plus its own update."""
        if not requests:
            return []
        t0 = time.perf_counter()
        ctx = self.prepare(model, tokenizer)
        (layer,) = ctx.layers
        targets = optimise_targets(ctx, tokenizer, requests, ctx.templates, self.hparams, layer, "mlp_out")
        keys = [check_finite(t.key, request, "key") for request, t in zip(requests, targets)]
        share = (time.perf_counter() - t0) / len(requests)
        return [self._update(ctx, request, k, target, share) for request, k, target in zip(requests, keys, targets)]

    def _edit_one(self, ctx: EditorContext, request: EditRequest) -> EditResult:
        t0 = time.perf_counter()
        (layer,) = ctx.layers
        target = optimise_targets(ctx, ctx.tokenizer, [request], ctx.templates, self.hparams, layer, "mlp_out")[0]
        k = check_finite(target.key, request, "key")
        return self._update(ctx, request, k, target, time.perf_counter() - t0)

    def _update(self, ctx: EditorContext, request: EditRequest, k: torch.Tensor, target: TargetVector,
                spent: float) -> EditResult:
        """The request's rank-one update from its key ``k`` and its optimised ``target`` (``spent``: the seconds
        its key and target took)."""
        t0 = time.perf_counter()
        hp = self.hparams
        (layer,) = ctx.layers
        u = torch.linalg.lu_solve(*self._cov_lu, k[:, None])[:, 0] if self._cov_lu is not None else k
        check_finite(target.delta, request, "v* delta")
        denom = torch.dot(u, k)
        update = torch.outer(target.delta.double().cpu(), u) / denom  # [out, in]
        check_finite(update, request, "rank-one update")
        refuse_zero_update([update], [ctx.adapter.mlp_out_weight(layer)], request, f"layer-{layer} rank-one update",
                           hp, [target])
        name, delta = ctx.adapter.mlp_out_delta(layer, update)
        diag = RequestDiagnostics(
            request.case_id, spent + time.perf_counter() - t0, target.losses, update.norm().item(),
            {"target_prob": target.target_prob, "nll": target.nll, "kl": target.kl, "steps": target.steps,
             "delta_v_norm": target.delta.norm().item(), "v0_norm": target.init.norm().item(),
             "key_norm": k.norm().item(), "u_dot_k": denom.item()},
        )
        log.info("rome %s: layer %d, p(target) %.3f after %d steps, |dW| %.3g, %.1f s", request.case_id, layer,
                 target.target_prob, target.steps, diag.delta_norm, diag.seconds)
        return EditResult(
            self.name, {name: delta}, [layer], [request.case_id], [diag],
            {**hp.to_dict(), "context_templates_used": ctx.templates}, diag.seconds,
        )
