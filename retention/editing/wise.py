"""WISE: a side copy of one MLP output projection, edited with the requests, and a router that sends a token to it
when the side and main memories disagree about it enough.

Wang et al. 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models"
(NeurIPS, arXiv 2405.14768). At layer L, with W the MLP output projection (main memory, ``[out, in]``) and x its
input at one token:

- the **side memory** W′ starts as a copy of W and is trained on the requests (SGD, ``lr``, ``steps``) with the
  gradient masked to a random fraction ``mask_ratio`` of its entries (the paper's knowledge-sharding mask, here
  one shard);
- the **activation score** of a token is ``Δ(x) = ‖x (W′ − W)ᵀ‖₂``, the distance between the two memories'
  outputs;
- the **loss** is the target's teacher-forced NLL with the side memory at the edit's routed positions, plus the
  paper's routing margins ``ReLU(Δ_irr − α) + ReLU(β − Δ_edit) + ReLU(γ − (Δ_edit − Δ_irr))`` over the edit's
  routed positions and the irrelevant ones (``act_margins`` = [α, β, γ]);
- the **router**: at inference a token whose Δ exceeds ε uses the side memory's output ``W′x + b``, every other
  token the main memory's output unchanged (the same tensor). ε = ``act_ratio`` × the smallest Δ over the routed
  positions of all edits the memory holds, recomputed after each editor call.

An edit's routed positions are the subject's last token and everything after it (prompt and target prefix): the
positions that carry the subject. Its earlier positions, and every position of ``irrelevant_prompts`` (generic
sentences standing in for the paper's unrelated training inputs), are the irrelevant ones. The paper scores
whole inputs; scoring each token keeps the route independent of where a sequence ends, so a prompt read alone
and the same prompt followed by its target are routed alike.

Left out: knowledge sharding into several side memories and their merge (Ties-merging), and WISE-Retrieve; a
sequential run edits the one side memory call after call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from retention.editing.base import Editor, EditorHParams, EditRequest, RequestDiagnostics, check_finite
from retention.editing.causal_trace import resolve_layers
from retention.editing.context import EditorContext
from retention.editing.memory import Memory, MemoryEditResult, MemoryState, attached, register_memory
from retention.editing.targets import trainable_only
from retention.editing.trace import (
    capture,
    layer_input,
    patch_outputs,
    start_at_layer,
    stop_after,
    subject_token_span,
)
from retention.tokens import prompt_ids, right_pad, target_ids

log = logging.getLogger(__name__)

IRRELEVANT = [
    "The weather in the mountains changes quickly in spring",
    "She opened the window and looked at the garden",
    "Water boils at a lower temperature at high altitude",
    "The committee will meet again next Tuesday afternoon",
    "He bought three apples and a loaf of bread",
    "Most trains leave the station every twenty minutes",
    "The novel was translated into several languages",
    "A square has four sides of equal length",
]


@dataclass
class WiseHParams(EditorHParams):
    """WISE hyperparameters (one side memory)."""

    layer: int = 20
    """The layer whose MLP output projection is copied into the side memory."""
    lr: float = 1.0
    """SGD learning rate of the side memory."""
    steps: int = 70
    """Optimisation steps per editor call."""
    mask_ratio: float = 0.2
    """Fraction of the side memory's entries an edit may change (the random gradient mask, seeded by ``seed``)."""
    act_margins: list[float] = field(default_factory=lambda: [5.0, 20.0, 10.0])
    """[α, β, γ]: irrelevant tokens' Δ below α, the edit's above β, and above the irrelevant ones' by γ."""
    act_ratio: float = 0.88
    """The router's threshold ε as a fraction of the smallest Δ over the edits' routed positions."""
    seed: int = 0
    """Seed of the gradient mask."""
    irrelevant_prompts: list[str] = field(default_factory=lambda: list(IRRELEVANT))
    """Texts whose tokens must stay on the main memory (the paper's unrelated inputs)."""

    def validate(self) -> None:
        super().validate()
        if self.steps < 1 or not self.lr > 0:
            raise ValueError(f"steps={self.steps}, lr={self.lr}: need steps >= 1 and lr > 0")
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio={self.mask_ratio}: must be in (0, 1]")
        if len(self.act_margins) != 3 or any(m < 0 for m in self.act_margins):
            raise ValueError(f"act_margins={self.act_margins}: give [alpha, beta, gamma], each >= 0")
        if not 0 < self.act_ratio <= 1:
            raise ValueError(f"act_ratio={self.act_ratio}: must be in (0, 1]")
        if not self.irrelevant_prompts:
            raise ValueError("irrelevant_prompts: give at least one text")


def side_difference(side: torch.Tensor, module: nn.Module, in_out: bool) -> torch.Tensor:
    """``W′ − W`` as ``[out, in]`` float32, W the module's weight as it is now."""
    weight = module.weight.t() if in_out else module.weight
    return side - weight.float()


@register_memory
class WiseMemory(Memory):
    """A WISE side memory: ``weight`` W′ ``[out, in]`` (float32); ``meta``: ``threshold`` ε, ``in_out`` (the
    module stores its weight ``[in, out]``), ``routes`` (each edit's token ids and first routed position) and
    ``case_ids``."""

    kind = "wise"

    def route(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = F.linear(x.float(), side_difference(self.weight, module, self.meta["in_out"]))
        hit = torch.linalg.vector_norm(delta.detach(), dim=-1) > self.meta["threshold"]
        if not bool(hit.any()):
            return y
        return torch.where(hit[..., None], (y.float() + delta).to(y.dtype), y)


class WiseEditor(Editor):
    """WISE with one side memory: each call trains it on the call's requests (on top of the side memory attached
    before the call, if any) and sets the router's threshold; the result is a memory result (the model keeps its
    weights and any memory attached before the call)."""

    edits_in_memory = True

    name = "wise"
    hparams_class = WiseHParams
    hparams: WiseHParams

    def _rows(self, tokenizer, requests: Sequence[EditRequest]):
        """Per edit phrasing: token ids (prompt + target but its last token), the first routed position, and the
        positions and tokens of the target."""
        rows = []
        for req in requests:
            tgt = target_ids(tokenizer, req.target_new)
            for template in req.templates:
                p = prompt_ids(tokenizer, template.format(req.subject))
                start = subject_token_span(tokenizer, template, req.subject)[1]
                rows.append((p + tgt[:-1], start, list(range(len(p) - 1, len(p) - 1 + len(tgt))), tgt))
        return rows

    def edit(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> MemoryEditResult:
        t0 = time.perf_counter()
        hp = self.hparams
        ctx = EditorContext(model, tokenizer)
        base, adapter, device = ctx.model, ctx.adapter, ctx.device
        (layer,) = resolve_layers([hp.layer], base)
        module = adapter.mlp_out(layer)
        installed = attached(module)
        if installed is not None and installed.kind != WiseMemory.kind:
            raise ValueError(f"wise: {adapter.mlp_out_name(layer)} holds a {installed.kind} memory")
        in_out = adapter.weight_is_in_out
        main = adapter.weight_to_out_in(module.weight).detach().float()
        side0 = installed.weight.detach().clone() if installed is not None else main.clone()
        routes = [list(r) for r in installed.meta["routes"]] if installed is not None else []
        case_ids = list(installed.meta["case_ids"]) if installed is not None else []

        edit_rows = self._rows(tokenizer, requests)
        irrelevant = [prompt_ids(tokenizer, t) for t in hp.irrelevant_prompts]
        seqs = [r[0] for r in edit_rows] + irrelevant
        ids, mask = (t.to(device) for t in right_pad(seqs, tokenizer.pad_token_id))
        routed = torch.zeros_like(mask, dtype=torch.bool)
        for i, (_, start, _, _) in enumerate(edit_rows):
            routed[i, start:] = mask[i, start:].bool()
        other = mask.bool() & ~routed
        pos_rows = torch.tensor([i for i, r in enumerate(edit_rows) for _ in r[2]], device=device)
        pos_cols = torch.tensor([c for r in edit_rows for c in r[2]], device=device)
        tokens = torch.tensor([t for r in edit_rows for t in r[3]], device=device)

        generator = torch.Generator().manual_seed(hp.seed)
        grad_mask = (torch.rand(main.shape, generator=generator) < hp.mask_ratio).float().to(device)
        side = side0.to(device).requires_grad_(True)
        opt = torch.optim.SGD([side], lr=hp.lr)
        alpha, beta, gamma = hp.act_margins
        losses: list[float] = []
        acts: dict[str, torch.Tensor] = {}

        def patch(x, y):
            delta = F.linear(x.float(), side - main)
            acts["delta"] = torch.linalg.vector_norm(delta, dim=-1)
            return torch.where(routed[..., None], (y.float() + delta).to(y.dtype), y)

        if installed is not None:
            installed.detach_from(module)
        was_training = base.training
        base.eval()
        try:
            with trainable_only(base):
                hidden = layer_input(base, layer, ids, mask, adapter)
                for _ in range(hp.steps):
                    with patch_outputs({module: patch}, with_input=True), start_at_layer(base, layer, hidden, adapter):
                        out = base.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    logits = base.get_output_embeddings()(out[pos_rows, pos_cols]).float()
                    token_nll = -torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
                    per_row = torch.zeros(len(edit_rows), device=device).index_add(0, pos_rows, token_nll)
                    nll = (per_row / torch.bincount(pos_rows, minlength=len(edit_rows))).mean()
                    act_edit, act_other = acts["delta"][routed], acts["delta"][other]
                    margin = (F.relu(act_other - alpha).mean() + F.relu(beta - act_edit).mean()
                              + F.relu(gamma - (act_edit[:, None] - act_other[None, :])).mean())
                    loss = nll + margin
                    losses.append(check_finite(loss.detach(), requests, "WISE loss").item())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    side.grad.mul_(grad_mask)
                    opt.step()
        finally:
            base.train(was_training)
            if installed is not None:
                installed.attach(module)
        side = check_finite(side.detach(), requests, "WISE side memory")
        routes += [[r[0], r[1]] for r in edit_rows]
        threshold = hp.act_ratio * self._smallest_routed_act(ctx, layer, side - main, routes)
        case_ids += [r.case_id for r in requests]
        state = MemoryState(adapter.mlp_out_name(layer), WiseMemory.kind, {"weight": side.float().cpu()},
                            {"threshold": threshold, "in_out": in_out, "routes": routes, "case_ids": case_ids})
        seconds = time.perf_counter() - t0
        change = torch.linalg.vector_norm(side - main).item() / torch.linalg.vector_norm(main).item()
        diags = [RequestDiagnostics(r.case_id, seconds, losses, torch.linalg.vector_norm(side - side0.to(device)).item(),
                                    {"steps": len(losses), "threshold": threshold, "side_relative_change": change})
                 for r in requests]
        log.info("wise: %d request(s) at layer %d, loss %.3f -> %.3f, threshold %.3g, |W'-W|/|W| %.3g, %.1f s",
                 len(requests), layer, losses[0], losses[-1], threshold, change, seconds)
        return MemoryEditResult(self.name, {}, [layer], [r.case_id for r in requests], diags, hp.to_dict(), seconds,
                                memory=state)

    @torch.no_grad()
    def _smallest_routed_act(self, ctx: EditorContext, layer: int, difference: torch.Tensor, routes) -> float:
        """The smallest Δ over the routed positions of ``routes`` (token ids, first routed position)."""
        ids, mask = (t.to(ctx.device) for t in right_pad([r[0] for r in routes], ctx.tokenizer.pad_token_id))
        module = ctx.adapter.mlp_out(layer)
        with capture({"f": module}, outputs=False) as seen, stop_after(module):
            ctx.model(input_ids=ids, attention_mask=mask, use_cache=False)
        act = torch.linalg.vector_norm(F.linear(seen["f"].input.float(), difference), dim=-1)
        routed = torch.zeros_like(mask, dtype=torch.bool)
        for i, (_, start) in enumerate(routes):
            routed[i, start:] = mask[i, start:].bool()
        return act[routed].min().item()
