"""Fine-tuning editors: constrained fine-tuning of the MLP output projection of chosen layers on the new targets.

- ``ft-l``: the constrained fine-tuning baseline of the ROME paper (Meng et al. 2022, §4; after Zhu et al. 2020,
  "Modifying Memories in Transformer Models"): every target token's NLL is taken from the distribution at the
  prompt's last token, and each weight entry stays within ``norm_constraint`` (L∞) of its original value.
- ``ft-m``: teacher-forced NLL masked to the target tokens (EasyEdit's FT-M; Zhang et al. 2024, "A Comprehensive
  Study of Knowledge Editing for Large Language Models"), the norm constraint optional.

Rows are the request's phrasings (prompt and augmentations) with the subject filled in; all requests of one call
are fine-tuned together. What is trained is a float32 delta ``Δ`` (``[out, in]``) added to the projection's
output as ``x Δᵀ`` — the same gradients as training the weight itself, with the update kept in float32 whatever
the model dtype and the weights untouched. The layers below the lowest edited layer run once (cached).
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
    Editor,
    EditorHParams,
    EditRequest,
    EditResult,
    RequestDiagnostics,
    check_finite,
)
from retention.editing.causal_trace import resolve_layers
from retention.editing.context import EditorContext
from retention.editing.targets import trainable_only
from retention.editing.trace import layer_input, patch_outputs, start_at_layer
from retention.tokens import prompt_ids, right_pad, target_ids

log = logging.getLogger(__name__)

VARIANTS = ("ft-l", "ft-m")


@dataclass
class FtHParams(EditorHParams):
    """Fine-tuning editor hyperparameters."""

    variant: str = "ft-m"
    """``ft-l`` (last-token loss, L∞ constraint) or ``ft-m`` (teacher-forced masked loss)."""
    layers: list[int] = field(default_factory=lambda: [0])
    """Layers whose MLP output projection is fine-tuned."""
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float | None = 5e-4
    """Bound on each weight entry's change (L∞); null for none."""
    early_stop_loss: float = 1e-2

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}: choose from {', '.join(VARIANTS)}")
        if not self.layers:
            raise ValueError("layers: give at least one layer")
        if self.steps < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"steps={self.steps}, lr={self.lr}: need steps >= 1 and a finite lr > 0")
        if self.norm_constraint is not None and not self.norm_constraint > 0:  # NaN is refused too
            raise ValueError(f"norm_constraint={self.norm_constraint}: must be > 0 or null")


def _linear_delta(delta: torch.Tensor):
    def patch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + (x.float() @ delta.t()).to(y.dtype)

    return patch


class FtEditor(Editor):
    """FT-L / FT-M: all requests of a call fine-tuned together into the chosen layers' MLP output projections."""

    name = "ft"
    hparams_class = FtHParams
    hparams: FtHParams

    def __init__(self, hparams: FtHParams):
        super().__init__(hparams)
        self.name = hparams.variant

    def _rows(self, tokenizer, requests: Sequence[EditRequest]):
        """Per phrasing: input ids, the positions whose logits are scored and the tokens they should give."""
        rows = []
        for req in requests:
            tgt = target_ids(tokenizer, req.target_new)
            for template in req.templates:
                p = prompt_ids(tokenizer, template.format(req.subject))
                if self.hparams.variant == "ft-m":
                    rows.append((p + tgt[:-1], list(range(len(p) - 1, len(p) - 1 + len(tgt))), tgt))
                else:
                    rows.append((p, [len(p) - 1] * len(tgt), tgt))
        return rows

    def edit(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> EditResult:
        t0 = time.perf_counter()
        hp = self.hparams
        ctx = EditorContext(model, tokenizer)
        base, adapter, device = ctx.model, ctx.adapter, ctx.device
        layers = sorted(set(resolve_layers(hp.layers, base)))
        rows = self._rows(tokenizer, requests)
        ids, mask = (t.to(device) for t in right_pad([r[0] for r in rows], tokenizer.pad_token_id))
        pos_rows = torch.tensor([i for i, (_, pos, _) in enumerate(rows) for _ in pos], device=device)
        pos_cols = torch.tensor([c for _, pos, _ in rows for c in pos], device=device)
        tokens = torch.tensor([t for _, _, tgt in rows for t in tgt], device=device)

        deltas = {
            i: torch.zeros_like(adapter.weight_to_out_in(adapter.mlp_out_weight(i)), dtype=torch.float32,
                                requires_grad=True)
            for i in layers
        }
        opt = torch.optim.Adam(deltas.values(), lr=hp.lr)
        losses: list[float] = []
        was_training = base.training
        base.eval()
        with trainable_only(base):
            hidden = layer_input(base, layers[0], ids, mask, adapter)
            patches = {adapter.mlp_out(i): _linear_delta(d) for i, d in deltas.items()}
            for _ in range(hp.steps):
                with patch_outputs(patches, with_input=True), start_at_layer(base, layers[0], hidden, adapter):
                    out = base.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                logits = base.get_output_embeddings()(out[pos_rows, pos_cols]).float()
                token_nll = -torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
                per_row = torch.zeros(len(rows), device=device).index_add(0, pos_rows, token_nll)
                per_row = per_row / torch.bincount(pos_rows, minlength=len(rows))
                loss = per_row.mean()
                losses.append(loss.item())
                if loss.item() < hp.early_stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        for d in deltas.values():
                            d.clamp_(-hp.norm_constraint, hp.norm_constraint)
        base.train(was_training)
        seconds = time.perf_counter() - t0
        out_deltas = {}
        norm2 = 0.0
        for i, d in deltas.items():
            d = d.detach()
            check_finite(d, requests, f"layer-{i} fine-tuning delta")
            name, delta = adapter.mlp_out_delta(i, d)
            out_deltas[name] = delta
            norm2 += d.double().norm().item() ** 2
        # One joint optimisation: every request shares the call's loss curve and update.
        diags = [RequestDiagnostics(r.case_id, seconds, losses, norm2**0.5, {"steps": len(losses)}) for r in requests]
        log.info("%s: %d request(s), layers %s, loss %.3f -> %.3f in %d steps, %.1f s", self.name, len(requests),
                 layers, losses[0], losses[-1], len(losses), seconds)
        return EditResult(self.name, out_deltas, layers, [r.case_id for r in requests], diags, hp.to_dict(), seconds)
