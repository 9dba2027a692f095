"""MEMIT: many facts written at once into the MLP output projections of a range of critical layers.

Meng et al. 2023, "Mass-Editing Memory in a Transformer" (MEMIT, arXiv 2210.07229), §3–4:

1. For each fact, a target ``z = h_L + δ`` for the hidden state at the *last* critical layer ``L`` (the decoder
   layer's output at the subject's last token), with δ from the shared optimiser
   (:func:`retention.editing.targets.optimise_targets`, ``site="layer"``); the facts of a batch are optimised
   together.
2. For each critical layer ``l`` in ascending order, on the model already updated at the layers below:
   keys ``K`` (the projection's input at the subject's last token, averaged over the context templates), the
   remaining residual ``R = (z − h_L) / (number of critical layers left)``, and the update

       ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹

   solved in float64, with ``C_l = E[k kᵀ]`` of the layer's keys over a text corpus
   (:mod:`retention.editing.covariance`) and ``λ = mom2_update_weight``; ``mom2_adjustment: false`` is the named
   ``C = I`` fallback.

Augmentation phrasings of a request share its δ and add key/value columns of their own: each phrasing gets its
key (averaged over the context templates) and its target ``z = h_L(phrasing) + δ``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from retention.editing.target_rows import rewriting_templates
from retention.editing.targets import TargetHParams, TargetVector, optimise_targets, refuse_zero_update
from retention.editing.trace import capture, stop_after, subject_last_token_index
from retention.tokens import prompt_ids, right_pad

log = logging.getLogger(__name__)


@dataclass
class MemitHParams(TargetHParams, KeyStatsHParams):
    """MEMIT hyperparameters (names follow the MEMIT code where they exist)."""

    layers: list[int] | str = field(default_factory=lambda: [3, 4, 5, 6, 7])
    """The critical layers (their MLP output projections), or ``located`` (from ``retention locate``); z is taken
    at the last one."""
    clamp_norm_factor: float = 0.75
    """‖δ‖ ≤ clamp_norm_factor · ‖h_L‖ (the layer output, hence a factor below 1)."""
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    """``[length, count]`` pairs of generated prefixes (MEMIT uses five of ten tokens)."""
    mom2_update_weight: float = 15000.0
    """λ, the weight of the preserved keys' covariance against the new keys."""
    batch_size: int = 64
    """Prompts per forward pass when computing keys."""

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layers, str):
            if self.layers != "located":
                raise ValueError(f"layers={self.layers!r}: give a list of layer indices or 'located'")
        elif not self.layers:
            raise ValueError("layers: at least one critical layer is needed")
        if self.mom2_update_weight < 0:
            raise ValueError(f"mom2_update_weight={self.mom2_update_weight}: must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")


@torch.no_grad()
def keys_and_values(
    model: nn.Module | EditorContext, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
    key_layer: int, value_layer: int | None = None, batch_size: int | None = 64, per: str = "phrasing",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per column: the key of ``key_layer`` (the MLP-out input at the subject's last token, averaged over the
    column's rewriting prompts) and the output of decoder layer ``value_layer`` there on the column's plain
    prompt; float64 ``[columns, in]`` and ``[columns, hidden]`` (None without ``value_layer``).

    ``per="phrasing"`` (MEMIT): a column per (request, phrasing), request-major, its key averaged over the context
    templates. ``per="request"`` (ROME's ``k̄``): a column per request, its key the mean over all of its rewriting
    prompts (context templates × phrasings). ``batch_size``: prompts per forward (None: all in one).
    ``model`` may be the :class:`EditorContext` of an editor call.
    """
    if per not in ("phrasing", "request"):
        raise ValueError(f"per={per!r}: choose 'phrasing' or 'request'")
    ctx = EditorContext.of(model, tokenizer)
    adapter, device = ctx.adapter, ctx.device
    modules = {"k": adapter.mlp_out(key_layer)}
    if value_layer is not None:
        modules["z"] = adapter.layer(value_layer)
    stop = modules["k"] if value_layer is None else adapter.layer(max(key_layer, value_layer))
    rows = []  # (column, is_plain, ids, subject position)
    column = 0
    for req in requests:
        phrasings = len(req.templates)
        for r, template in enumerate(rewriting_templates(req, templates)):
            ids = prompt_ids(tokenizer, template.format(req.subject))
            pos = subject_last_token_index(tokenizer, template, req.subject)
            if per == "phrasing":
                rows.append((column + r % phrasings, r < phrasings, ids, pos))
            else:
                rows.append((column, r == 0, ids, pos))
        column += phrasings if per == "phrasing" else 1
    keys = torch.zeros(column, adapter.key_size(key_layer), dtype=torch.float64)
    counts = torch.zeros(column, dtype=torch.float64)
    values = None if value_layer is None else torch.zeros(column, adapter.hidden_size, dtype=torch.float64)
    parts: dict[int, list[torch.Tensor]] = {}  # per="request": each column's keys, averaged at the end
    step = batch_size or len(rows)
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        ids, mask = right_pad([row_ids for _, _, row_ids, _ in chunk], tokenizer.pad_token_id)
        with capture(modules, outputs=values is not None) as rec, stop_after(stop):
            ctx.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        at = (torch.arange(len(chunk)), torch.tensor([pos for *_, pos in chunk]))
        k = rec["k"].input[at].to(torch.float64)
        z = None if values is None else rec["z"].output[at].to(torch.float64).cpu()
        if per == "request":
            for col in dict.fromkeys(col for col, *_ in chunk):
                parts.setdefault(col, []).append(k[[i for i, row in enumerate(chunk) if row[0] == col]])
        else:
            k = k.cpu()
        for i, (col, plain, _, _) in enumerate(chunk):
            if per == "phrasing":
                keys[col] += k[i]
                counts[col] += 1
            if plain and values is not None:
                values[col] = z[i]
    if per == "request":
        for col, pieces in parts.items():
            keys[col] = torch.cat(pieces).mean(0).cpu()
        return keys, values
    return keys / counts[:, None], values


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor | None, weight: float) -> torch.Tensor:
    """``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` (float64 ``[out, in]``) for keys ``[n, in]`` and residuals ``[n, out]``;
    ``cov=None`` means C = I."""
    k, r = keys.double().T, resid.double().T
    c = torch.eye(k.shape[0], dtype=torch.float64) if cov is None else cov.double()
    # (λC + KKᵀ) is symmetric, so R Kᵀ A⁻¹ = (A⁻¹ K Rᵀ)ᵀ.
    return torch.linalg.solve(weight * c + k @ k.T, k @ r.T).T


class MemitEditor(LocateThenEditEditor):
    """MEMIT: one update of every critical layer's MLP output projection for a whole batch of requests."""

    name = "memit"
    hparams_class = MemitHParams
    hparams: MemitHParams

    def layer_setting(self) -> list[int] | str:
        return self.hparams.layers

    def _solve(self, ctx: EditorContext, index: int, layer: int, keys: torch.Tensor,
               resid: torch.Tensor) -> torch.Tensor:
        """The ``[out, in]`` float64 update of critical layer ``layer`` (``index`` in the critical layers)."""
        return memit_delta(keys, resid, ctx.covs.get(layer), self.hparams.mom2_update_weight)

    def edit(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> EditResult:
        """Compute the batch's update layer by layer (each on the model updated below it); the model is restored."""
        t0 = time.perf_counter()
        ctx = self.prepare(model, tokenizer)
        targets = optimise_targets(ctx, tokenizer, requests, ctx.templates, self.hparams, ctx.layers[-1], "layer")
        return self._write(ctx, requests, targets, time.perf_counter() - t0)

    def edit_singles(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[EditResult]:
        """Each request's update on the model as it is, as :meth:`edit` of it alone computes it, but with the z
        targets of all requests optimised together (one :func:`~retention.editing.targets.optimise_targets`: per
        request its own δ, Adam state, clamp and early stop; only float rounding from padding differs). Each
        request's layer-by-layer update is then solved alone: its keys above the first critical layer come from
        the model updated by its own lower layers, so they cannot be shared. A request's ``seconds``: an equal
        share of the target optimisation plus its own update."""
        if not requests:
            return []
        t0 = time.perf_counter()
        ctx = self.prepare(model, tokenizer)
        targets = optimise_targets(ctx, tokenizer, requests, ctx.templates, self.hparams, ctx.layers[-1], "layer")
        share = (time.perf_counter() - t0) / len(requests)
        results = []
        for request, target in zip(requests, targets):
            self.prepare(model, tokenizer)  # as edit() of the request alone would (AlphaEdit drops stale keys)
            results.append(self._write(ctx, [request], [target], share))
        return results

    def _write(self, ctx: EditorContext, requests: Sequence[EditRequest], targets: Sequence[TargetVector],
               spent: float) -> EditResult:
        """The update that writes the ``targets`` of ``requests`` (``spent``: the seconds they took)."""
        t0 = time.perf_counter()
        hp, tokenizer = self.hparams, ctx.tokenizer
        base, adapter = ctx.model, ctx.adapter
        layers, z_layer = ctx.layers, ctx.layers[-1]
        for req, target in zip(requests, targets):
            check_finite(target.delta, req, "z delta")
        owner = torch.tensor([f for f, req in enumerate(requests) for _ in req.templates])
        deltas = torch.stack([t.delta.double().cpu() for t in targets])[owner]
        applied: list[EditResult] = []
        norms: dict[int, float] = {}
        written: list[tuple[torch.Tensor, torch.Tensor]] = []
        z = None
        try:
            for i, layer in enumerate(layers):
                keys, cur = keys_and_values(ctx, tokenizer, requests, ctx.templates, layer, z_layer, hp.batch_size)
                if z is None:
                    z = cur + deltas
                resid = (z - cur) / (len(layers) - i)
                update = self._solve(ctx, i, layer, keys, resid)
                for req in requests:
                    check_finite(update, req, f"layer-{layer} update")
                written.append((update, adapter.mlp_out_weight(layer)))
                name, delta = adapter.mlp_out_delta(layer, update)
                step = EditResult(self.name, {name: delta}, [layer], [])
                step.apply(base)
                applied.append(step)
                norms[layer] = update.norm().item()
                log.info("%s layer %d: %d key(s), residual %.3g, |dW| %.3g", self.name, layer, len(keys),
                         resid.norm(dim=1).mean().item() * (len(layers) - i), norms[layer])
            refuse_zero_update([u for u, _ in written], [w for _, w in written], requests,
                               f"update of layers {layers}", hp, targets)
            self._after_batch(ctx, requests)
        finally:
            for step in reversed(applied):
                step.revert(base)
        seconds = spent + time.perf_counter() - t0
        diagnostics = [
            RequestDiagnostics(
                req.case_id, seconds / len(requests), t.losses, math.nan,
                {"target_prob": t.target_prob, "nll": t.nll, "kl": t.kl, "steps": t.steps,
                 "delta_z_norm": t.delta.norm().item(), "z0_norm": t.init.norm().item()},
            )
            for req, t in zip(requests, targets)
        ]
        log.info("%s: %d request(s) into layers %s in %.1f s", self.name, len(requests), layers, seconds)
        return EditResult(
            self.name, {n: d for s in applied for n, d in s.deltas.items()}, list(layers),
            [r.case_id for r in requests], diagnostics,
            {**hp.to_dict(), "layers_used": list(layers), "context_templates_used": ctx.templates,
             "update_norms": norms, **self._info()},
            seconds,
        )

    def _after_batch(self, ctx: EditorContext, requests: Sequence[EditRequest]) -> None:
        """Called with the batch's updates applied (AlphaEdit records the new keys here)."""

    def _info(self) -> dict:
        """Editor-specific entries of the result's ``hparams`` record."""
        return {}
