"""GRACE: a codebook of keys, values and deferral radii at one MLP output projection.

Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors" (NeurIPS,
arXiv 2211.11031). At layer L, with f the MLP output projection:

- a **key** is f's input at the prompt's last token (one key per rewriting phrasing);
- its **value** replaces f's output there; it starts at f's own output and is optimised (Adam, ``value_lr``,
  ``value_steps``) so that the model continues the prompt with the new target (teacher-forced NLL of the target
  tokens, read through the whole model above L);
- at inference, at every token position, the nearest key within its radius ε replaces f's output by its value;
  a position no key covers gets f's own output unchanged (the same tensor: bit for bit).

The codebook grows by the paper's rules. For a new key h with label y and the nearest key k with radius ε_k:
farther than ``ε_k + radius`` → a new entry (h, v, ``radius``); within that reach and the same label → ε_k grows to
cover h (``max(ε_k, d)``, with a relative margin of :data:`REACH_MARGIN` against float noise) and k's value is optimised on the new phrasing too; a different label → both radii
become d/2 (the balls touch, they do not overlap) and h gets its own value.

Deciding per position (the paper speaks of one representation per input) makes the replacement independent of
where a sequence ends: the last prompt token gets the value whether the model reads the prompt alone (top-1,
generation) or followed by the target (teacher-forced scoring), so the editor optimises what the scorer scores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from retention.editing.base import (
    EditError,
    Editor,
    EditorHParams,
    EditRequest,
    RequestDiagnostics,
    check_finite,
    describe_requests,
)
from retention.editing.causal_trace import resolve_layers
from retention.editing.context import EditorContext
from retention.editing.memory import Memory, MemoryEditResult, MemoryState, attached, register_memory
from retention.editing.targets import trainable_only
from retention.editing.trace import capture, layer_input, patch_outputs, start_at_layer, stop_after
from retention.tokens import prompt_ids, right_pad, target_ids

log = logging.getLogger(__name__)

REACH_MARGIN = 1e-3
"""Relative margin by which an expanded radius exceeds the distance to the phrasing it grows to cover."""


@dataclass
class GraceHParams(EditorHParams):
    """GRACE hyperparameters."""

    layer: int = 5
    """The layer whose MLP output projection holds the codebook."""
    radius: float = 1.0
    """ε_init: the deferral radius of a new key (Euclidean distance between projection inputs)."""
    value_lr: float = 1.0
    """Adam learning rate of a value."""
    value_steps: int = 100
    """Most optimisation steps per value."""
    early_stop_loss: float = 0.05
    """A value stops when the target's mean NLL falls below this."""

    def validate(self) -> None:
        super().validate()
        if not self.radius > 0:
            raise ValueError(f"radius={self.radius}: must be > 0")
        if self.value_steps < 1 or not self.value_lr > 0:
            raise ValueError(f"value_steps={self.value_steps}, value_lr={self.value_lr}: need value_steps >= 1 and "
                             "value_lr > 0")
        if self.early_stop_loss < 0:
            raise ValueError(f"early_stop_loss={self.early_stop_loss}: must be >= 0")


def grace_route(keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor, x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    """``y`` with each position whose input ``x`` lies within the radius of its nearest key replaced by that key's
    value; ``y`` itself when no position is covered."""
    if keys.shape[0] == 0:
        return y
    flat = x.reshape(-1, x.shape[-1]).to(keys.dtype)
    dist, nearest = torch.cdist(flat, keys).min(dim=1)
    hit = dist <= radii[nearest]
    if not bool(hit.any()):
        return y
    replaced = values[nearest].to(y.dtype).reshape(*y.shape)
    return torch.where(hit.reshape(*y.shape[:-1], 1), replaced, y)


@register_memory
class GraceMemory(Memory):
    """A GRACE codebook: ``keys`` [n, in], ``values`` [n, out], ``radii`` [n] (float32); ``meta``: ``labels`` and
    ``key_case_ids`` per key, ``case_ids`` of every edit."""

    kind = "grace"

    def route(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return grace_route(self.keys, self.values, self.radii, x.detach(), y)


class GraceEditor(Editor):
    """GRACE: requests added to the codebook one phrasing at a time; the codebook is returned as a memory result
    (the model keeps its weights and any codebook attached before the call)."""

    edits_in_memory = True

    name = "grace"
    hparams_class = GraceHParams
    hparams: GraceHParams

    def edit(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> MemoryEditResult:
        t0 = time.perf_counter()
        hp = self.hparams
        ctx = EditorContext(model, tokenizer)
        (layer,) = resolve_layers([hp.layer], ctx.model)
        module = ctx.adapter.mlp_out(layer)
        installed = attached(module)
        if installed is not None and installed.kind != GraceMemory.kind:
            raise ValueError(f"grace: {ctx.adapter.mlp_out_name(layer)} holds a {installed.kind} memory")
        keys, values, radii, meta = self._start(ctx, layer, installed)
        diags = []
        if installed is not None:
            installed.detach_from(module)  # the working codebook stands in for it while values are optimised
        try:
            for req in requests:
                t1 = time.perf_counter()
                losses, values_info = [], {}
                for template in req.templates:
                    keys, values, radii, info, step_losses = self._add(ctx, layer, req, template, keys, values, radii,
                                                                       meta)
                    losses += step_losses
                    values_info = {**info, "codebook_size": keys.shape[0]}
                meta["case_ids"].append(req.case_id)
                diags.append(RequestDiagnostics(req.case_id, time.perf_counter() - t1, losses, float("nan"),
                                                values_info))
        finally:
            if installed is not None:
                installed.attach(module)
        state = MemoryState(ctx.adapter.mlp_out_name(layer), GraceMemory.kind,
                            {"keys": keys, "values": values, "radii": radii}, meta)
        seconds = time.perf_counter() - t0
        log.info("grace: %d request(s) at layer %d, codebook of %d keys, %.1f s", len(requests), layer,
                 keys.shape[0], seconds)
        return MemoryEditResult(self.name, {}, [layer], [r.case_id for r in requests], diags, hp.to_dict(), seconds,
                                memory=state)

    @staticmethod
    def _start(ctx: EditorContext, layer: int, installed: Memory | None):
        """The codebook to extend: the attached one's (a copy), or an empty one."""
        if installed is not None:
            state = installed.tensors()
            meta = {k: list(v) for k, v in installed.meta.items()}
            return state["keys"], state["values"], state["radii"], meta
        size_in = ctx.adapter.key_size(layer)
        size_out = ctx.adapter.hidden_size
        empty = dict(dtype=torch.float32, device="cpu")
        return (torch.zeros(0, size_in, **empty), torch.zeros(0, size_out, **empty), torch.zeros(0, **empty),
                {"labels": [], "key_case_ids": [], "case_ids": []})

    @torch.no_grad()
    def _key(self, ctx: EditorContext, layer: int, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection's input and output at the prompt's last token (float32, on the CPU)."""
        module = ctx.adapter.mlp_out(layer)
        ids = torch.tensor([prompt_ids(ctx.tokenizer, prompt)], device=ctx.device)
        with capture({"f": module}) as seen, stop_after(module):
            ctx.model(input_ids=ids, use_cache=False)
        return seen["f"].input[0, -1].float().cpu(), seen["f"].output[0, -1].float().cpu()

    def _add(self, ctx: EditorContext, layer: int, req: EditRequest, template: str, keys, values, radii, meta):
        """The codebook with one phrasing added by GRACE's rules, its value optimised."""
        hp = self.hparams
        prompt = template.format(req.subject)
        key, output = self._key(ctx, layer, prompt)
        check_finite(key, req, "GRACE key")
        keys, values, radii = keys.clone(), values.clone(), radii.clone()
        info: dict[str, float | str] = {}
        if keys.shape[0]:
            dist, idx = torch.cdist(key[None], keys)[0].min(dim=0)
            d, i = dist.item(), int(idx)
            info["nearest_distance"] = d
        if not keys.shape[0] or d > radii[i].item() + hp.radius:
            rule, slot = "add", keys.shape[0]
        elif meta["labels"][i] == req.target_new:
            rule, slot = "expand", i
            # The value is optimised in another forward (prompt and target), whose floats can put the phrasing a
            # hair beyond d: a ball grown to exactly d would then miss the phrasing it was grown for.
            radii[i] = max(radii[i].item(), d * (1 + REACH_MARGIN))
        else:
            rule, slot = "split", keys.shape[0]
            radii[i] = d / 2
        if slot == keys.shape[0]:
            radius = hp.radius if rule == "add" else d / 2
            keys = torch.cat([keys, key[None]])
            values = torch.cat([values, output[None]])
            radii = torch.cat([radii, torch.tensor([radius])])
            meta["labels"].append(req.target_new)
            meta["key_case_ids"].append(req.case_id)
        values[slot], losses = self._optimise_value(ctx, layer, prompt, req, keys, values, radii, slot)
        info.update(rule=rule, radius=radii[slot].item(), steps=len(losses))
        return keys, values, radii, info, losses

    def _optimise_value(self, ctx: EditorContext, layer: int, prompt: str, req: EditRequest, keys, values, radii,
                        slot: int) -> tuple[torch.Tensor, list[float]]:
        hp = self.hparams
        base, adapter, device = ctx.model, ctx.adapter, ctx.device
        p = prompt_ids(ctx.tokenizer, prompt)
        tgt = target_ids(ctx.tokenizer, req.target_new)
        ids, mask = (t.to(device) for t in right_pad([p + tgt[:-1]], ctx.tokenizer.pad_token_id))
        cols = torch.arange(len(p) - 1, len(p) - 1 + len(tgt), device=device)
        tokens = torch.tensor(tgt, device=device)
        keys_d, radii_d, others = keys.to(device), radii.to(device), values.to(device)
        value = values[slot].clone().to(device).requires_grad_(True)
        opt = torch.optim.Adam([value], lr=hp.value_lr)
        rows = torch.arange(others.shape[0], device=device)[:, None] == slot
        losses: list[float] = []
        was_training = base.training
        base.eval()
        with trainable_only(base):
            hidden = layer_input(base, layer, ids, mask, adapter)
            for _ in range(hp.value_steps):
                book = torch.where(rows, value[None], others)

                def patch(x, y, book=book):
                    return grace_route(keys_d, book, radii_d, x, y)

                with patch_outputs({adapter.mlp_out(layer): patch}, with_input=True), \
                        start_at_layer(base, layer, hidden, adapter):
                    out = base.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                logits = base.get_output_embeddings()(out[0, cols]).float()
                loss = -torch.log_softmax(logits, -1).gather(1, tokens[:, None]).mean()
                if not loss.requires_grad:
                    raise EditError(f"GRACE: the phrasing {prompt!r} of {describe_requests([req])} lies outside every "
                                    "ball of the codebook, so no value reaches its output")
                losses.append(check_finite(loss.detach(), req, "GRACE value loss").item())
                if losses[-1] < hp.early_stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        base.train(was_training)
        return check_finite(value.detach().float().cpu(), req, "GRACE value"), losses
