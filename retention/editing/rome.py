"""ROME in its r-ROME form: a rank-one update of one MLP output projection per fact.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (ROME, arXiv 2202.05262); Gupta et al. 2024,
"Rebuilding ROME: Resolving Model Collapse during Sequential Model Editing" (r-ROME, arXiv 2403.07175).

For a fact with subject s at layer L, with W the projection as an ``[out, in]`` matrix:

- key: ``k̄`` = the projection's input at the subject's last token, averaged over the rewriting prompts (context
  templates × the prompt and its augmentation phrasings);
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

from retention.arch import ArchAdapter, unwrap_model
from retention.editing.base import (
    Editor,
    EditRequest,
    EditResult,
    RequestDiagnostics,
    check_finite,
)
from retention.editing.causal_trace import resolve_layers
from retention.editing.covariance import KeyStatsHParams, key_covariance
from retention.editing.targets import (
    TargetConfig,
    TargetHParams,
    context_templates,
    optimise_targets,
    rewriting_templates,
)
from retention.editing.trace import capture, stop_after, subject_last_token_index
from retention.models import model_fingerprint
from retention.tokens import prompt_ids, right_pad

log = logging.getLogger(__name__)


@dataclass
class RomeHParams(TargetHParams, KeyStatsHParams):
    """ROME hyperparameters (names follow the ROME code where they exist)."""

    layer: int = 5
    """The edited layer (its MLP output projection)."""

    def target_config(self) -> TargetConfig:
        return self.optimiser_config(self.layer, "mlp_out")


@torch.no_grad()
def average_key(model: nn.Module, tokenizer, layer: int, request: EditRequest,
                context_templates: Sequence[str]) -> torch.Tensor:
    """``k̄``: the MLP-out input at the subject's last token, averaged over the rewriting prompts (float64)."""
    adapter = ArchAdapter.for_model(model)
    module = adapter.mlp_out(layer)
    templates = rewriting_templates(request, context_templates)
    encoded = [prompt_ids(tokenizer, t.format(request.subject)) for t in templates]
    positions = [subject_last_token_index(tokenizer, t, request.subject) for t in templates]
    ids, mask = right_pad(encoded, tokenizer.pad_token_id)
    device = adapter.embed.weight.device
    with capture({"k": module}, outputs=False) as rec, stop_after(module):
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    keys = rec["k"].input[torch.arange(len(encoded)), torch.tensor(positions)]
    return keys.to(torch.float64).mean(0).cpu()


class RomeEditor(Editor):
    """r-ROME: one rank-one update of ``layer``'s MLP output projection per request, requests in turn."""

    name = "rome"
    hparams_class = RomeHParams
    hparams: RomeHParams

    def __init__(self, hparams: RomeHParams):
        super().__init__(hparams)
        # Context templates and the covariance come from the first (unedited) model an instance edits, so a
        # sequential run does not recompute them after every edit.
        self._model_id: int | None = None
        self.templates: list[str] = []
        """The context templates in use (plain ``"{}"`` first)."""
        self._cov_lu: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare(self, model: nn.Module, tokenizer) -> None:
        """Context templates and key statistics for ``model`` (the first edit of a model does this)."""
        if self._model_id == id(model):
            return
        hp = self.hparams
        fingerprint = model_fingerprint(model)
        self.templates = context_templates(model, tokenizer, hp.context_templates, hp.context_seed, fingerprint)
        self._cov_lu = None
        if hp.mom2_adjustment:
            (layer,) = resolve_layers([hp.layer], model)
            c = key_covariance(model, tokenizer, layer, hp.covariance_spec(), fingerprint)
            self._cov_lu = torch.linalg.lu_factor(c)
        else:
            log.info("rome: mom2_adjustment is off: C = I (u is the averaged key itself)")
        self._model_id = id(model)

    def edit(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> EditResult:
        """Compute each request's update on the model edited by the previous ones; the model is restored after."""
        t0 = time.perf_counter()
        base = unwrap_model(model)
        self.prepare(base, tokenizer)
        done: list[EditResult] = []
        try:
            for req in requests:
                result = self._edit_one(base, tokenizer, req)
                result.apply(base)
                done.append(result)
        finally:
            for result in reversed(done):
                result.revert(base)
        merged = EditResult.merge(done)
        merged.seconds = time.perf_counter() - t0
        return merged

    def _edit_one(self, model: nn.Module, tokenizer, request: EditRequest) -> EditResult:
        t0 = time.perf_counter()
        hp = self.hparams
        adapter = ArchAdapter.for_model(model)
        (layer,) = resolve_layers([hp.layer], model)
        k = check_finite(average_key(model, tokenizer, layer, request, self.templates), request, "key")
        u = torch.linalg.lu_solve(*self._cov_lu, k[:, None])[:, 0] if self._cov_lu is not None else k
        target = optimise_targets(model, tokenizer, [request], self.templates, hp.target_config())[0]
        check_finite(target.delta, request, "v* delta")
        denom = torch.dot(u, k)
        update = torch.outer(target.delta.double().cpu(), u) / denom  # [out, in]
        check_finite(update, request, "rank-one update")
        weight = adapter.mlp_out_weight(layer)
        delta = adapter.delta_to_weight(update.float()).contiguous().to(weight.device)
        diag = RequestDiagnostics(
            request.case_id, time.perf_counter() - t0, target.losses, update.norm().item(),
            {"target_prob": target.target_prob, "nll": target.nll, "kl": target.kl, "steps": target.steps,
             "delta_v_norm": target.delta.norm().item(), "v0_norm": target.init.norm().item(),
             "key_norm": k.norm().item(), "u_dot_k": denom.item()},
        )
        log.info("rome %s: layer %d, p(target) %.3f after %d steps, |dW| %.3g, %.1f s", request.case_id, layer,
                 target.target_prob, target.steps, diag.delta_norm, diag.seconds)
        return EditResult(
            self.name, {f"{adapter.mlp_out_name(layer)}.weight": delta}, [layer], [request.case_id], [diag],
            {**hp.to_dict(), "context_templates_used": self.templates}, diag.seconds,
        )
