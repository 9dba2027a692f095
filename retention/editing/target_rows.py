"""The prompt rows of the v*/z optimiser (:mod:`retention.editing.targets`) and how a step runs them.

A fact's rows are its rewriting prompts (context templates × phrasings, each followed by the target's tokens but
the last) and its KL prompts. The rows of a batch are sorted by the positions a step runs and cut into chunks of
similar width (:func:`plan_chunks`). A :class:`Chunk` holds one chunk's forward inputs and loss indices, and the
keys and values of the positions δ never reaches, as :class:`KeyValueRecorder` read them once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from retention.editing.base import EditRequest
from retention.editing.trace import subject_last_token_index
from retention.tokens import prompt_ids, target_ids


def rewriting_templates(request: EditRequest, context_templates: Sequence[str]) -> list[str]:
    """Context templates × the request's phrasings, as templates with ``{}`` for the subject (plain prompt first)."""
    if not context_templates or context_templates[0] != "{}":
        raise ValueError(f"context templates must start with the plain '{{}}', got {list(context_templates)[:1]}")
    return [c.replace("{}", t) for c in context_templates for t in request.templates]


@dataclass
class PromptRow:
    fact: int
    ids: list[int]
    subject: int
    """Position of the subject's last token (where δ is added)."""
    targets: list[int] | None
    """Target tokens predicted from positions ``len(ids) - len(targets)`` onwards; None for a KL row."""
    share: float
    """The row's weight in its fact's mean NLL (rewriting row) or mean KL (KL row)."""
    plain: bool = False
    """The fact's plain prompt, where ``v₀`` is read."""


def prompt_rows(tokenizer, requests: Sequence[EditRequest], context_templates: Sequence[str],
          kl_prompts: Sequence[str]) -> list[PromptRow]:
    rows = []
    for f, req in enumerate(requests):
        tgt = target_ids(tokenizer, req.target_new)
        templates = rewriting_templates(req, context_templates)
        for k, t in enumerate(templates):
            ids = prompt_ids(tokenizer, t.format(req.subject)) + tgt[:-1]
            rows.append(PromptRow(f, ids, subject_last_token_index(tokenizer, t, req.subject), tgt, 1 / len(templates),
                             plain=k == 0))
        for t in kl_prompts:
            rows.append(PromptRow(f, prompt_ids(tokenizer, t.format(req.subject)),
                             subject_last_token_index(tokenizer, t, req.subject), None, 1 / len(kl_prompts)))
    return rows


CHUNK_COST = 32
"""A forward/backward's fixed cost in padded token positions, weighed against padding when rows are grouped."""


def plan_chunks(rows: Sequence[PromptRow], facts: Sequence[int], max_rows: int, split: bool = False) -> list[list[int]]:
    """The rows of ``facts``, sorted by the positions a step runs of them (all, or from the subject's last token on
    when ``split``) and cut into groups of at most ``max_rows`` rows that minimise the padded positions computed
    plus a fixed cost per group (dynamic programming over the sorted widths)."""
    wanted = set(facts)
    widths = [len(r.ids) - (r.subject if split else 0) for r in rows]
    order = sorted((i for i, r in enumerate(rows) if r.fact in wanted), key=lambda i: widths[i])
    cost = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width = widths[order[end - 1]]
        for begin in range(max(0, end - max_rows), end):
            c = cost[begin] + (end - begin) * width + CHUNK_COST
            if c < cost[end]:
                cost[end], cut[end] = c, begin
    groups = []
    end = len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class KeyValueRecorder(DynamicCache):
    """A key/value cache that also keeps what each layer gave it (read without the cache's own, version-dependent,
    layout)."""

    def __init__(self):
        super().__init__()
        self.given: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.given[layer_idx] = (key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclass
class Chunk:
    """A chunk's forward inputs and loss indices, built once for as long as its rows run together.

    Split (``held`` not empty): a row's positions before its subject's last token never see δ (it is added at
    that token and attention is causal), so their keys and values at layers ``L`` on are computed once and held
    (left-padded to the chunk's longest such prefix); a step runs only the positions from the subject's last
    token on. Column ``j`` of a split row is position ``shift + j`` of the row.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    """The 2D padding mask of a plain chunk; a split chunk's 4D additive mask over held then run positions."""
    hidden: torch.Tensor | None
    """The run positions' input of layer ``L`` (None: every layer runs)."""
    positions: torch.Tensor | None
    """A split chunk's position ids of the run positions."""
    held: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """Layer -> the held keys and values of the positions before the subjects (empty: a plain chunk)."""
    subject: torch.Tensor
    """Per row the column of the subject's last token."""
    logit_rows: torch.Tensor
    logit_cols: torch.Tensor
    """Where logits are needed: each target-predicting position of a rewriting row, the subject of a KL row."""
    tok_at: torch.Tensor
    tok: torch.Tensor
    tok_row: torch.Tensor
    """Per target token its logit row, its id and its chunk row."""
    counts: torch.Tensor
    """Per chunk row its target tokens (at least 1)."""
    kl_at: torch.Tensor
    kl_row: list[int]
    """Per KL row its logit row and its chunk row."""

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.held.values() for t in kv)
