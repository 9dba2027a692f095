"""Rehearsal: the edited statements mixed into the fine-tuning stream at a stated rate.

A statement is a prompt with the subject filled in, followed by ``" " + target`` (``target_new`` for an edited
fact, ``target_true`` for a control fact when ``controls`` is on), tokenised as the scorer reads it
(:mod:`retention.tokens`). The prompts are the rewrite prompt, and with ``phrasings: editing`` also the
editing phrasings of :func:`retention.data.phrasings.template_phrasings` (the record's own augmentation
phrasings, topped up from its relation's templates). An evaluation paraphrase is never rehearsed: it measures
generalisation.

Before each training batch, ``rate * batch_size`` of its rows on average are replaced by statements (the last
rows of the batch; the sampler has shuffled them already). The number per batch is Bresenham-accumulated over
the micro-batch count, and the statements are taken round-robin through a seeded permutation reshuffled on
each pass, both functions of ``(seed, global_step)`` only, so a resumed run rehearses what the uninterrupted one
would have; under DDP each rank takes its own statements. Every statement token carries loss (padding is
labelled -100). The rows and tokens rehearsed are in ``summary.json`` (``rehearsal_rows``,
``rehearsal_tokens``, summed over ranks).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from retention.data.phrasings import template_phrasings
from retention.data.selection import KnowledgeSets
from retention.data.tasks.examples import IGNORE_INDEX, pad_id
from retention.pipeline_contract import PipelineCallback
from retention.tokens import prompt_ids, target_ids

Phrasings = Literal["rewrite", "editing"]
PHRASINGS = ("rewrite", "editing")


def statements(sets: KnowledgeSets, phrasings: str = "rewrite", controls: bool = False, k: int = 3,
               seed: int = 0) -> list[tuple[str, str]]:
    """``(prompt, target)`` pairs to rehearse: each edit's prompts with ``target_new``, then (``controls``) each
    control fact's with ``target_true``; evaluation paraphrases never."""
    records = [(r, r.target_new) for r in sets.edit] + ([(r, r.target_true) for r in sets.control] if controls else [])
    out = []
    for record, target in records:
        templates = [record.prompt]
        if phrasings == "editing":
            templates += template_phrasings(record, k, "record", seed)
        out += [(t.format(record.subject), target) for t in templates]
    return out


def rehearsed_rows(rate: float, batch_size: int, micro_batch: int) -> tuple[int, int]:
    """``(first, n)``: the rehearsal count before micro-batch ``micro_batch`` and how many rows it rehearses
    (Bresenham: ``floor(rate * batch_size * m)`` rows over the first ``m`` micro-batches)."""
    first = math.floor(rate * batch_size * micro_batch)
    return first, math.floor(rate * batch_size * (micro_batch + 1)) - first


class Rehearsal(PipelineCallback):
    """Replaces a stated fraction of every training batch's rows by edited statements (see the module
    docstring)."""

    runs_after = ("ApplyEdits",)

    def __init__(self, rate: float = 0.0, phrasings: Phrasings = "rewrite", controls: bool = False, k: int = 3,
                 seed: int = 0):
        """
        Args:
            rate: fraction of training sequences per batch replaced by rehearsal statements (0: off; below 1).
            phrasings: ``rewrite``: the rewrite prompt only; ``editing``: also up to ``k`` editing phrasings
                per fact (never an evaluation paraphrase).
            controls: rehearse the control facts' true statements too (the fair comparison).
            k: editing phrasings per fact with ``phrasings: editing``.
            seed: seed of the statement order.
        """
        if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
            raise ValueError(f"--rehearsal.rate={rate}: must be in [0, 1) (0 turns rehearsal off)")
        if phrasings not in PHRASINGS:
            raise ValueError(f"--rehearsal.phrasings={phrasings!r}: unknown; choose from {', '.join(PHRASINGS)}")
        if k < 0:
            raise ValueError(f"--rehearsal.k={k}: must be >= 0")
        self.rate, self.phrasings, self.controls, self.k, self.seed = float(rate), phrasings, controls, k, seed
        self.sequences: list[list[int]] = []
        """The tokenised statements."""
        self.rows = 0
        self.tokens = 0

    @override
    def on_edits_applied(self, trainer: Trainer, pl_module: LightningModule, sets: KnowledgeSets) -> None:
        if self.rate == 0:
            return
        pairs = statements(sets, self.phrasings, self.controls, self.k, self.seed)
        if not pairs:
            raise ValueError(f"--rehearsal.rate={self.rate}: there is nothing to rehearse (no edited facts"
                             f"{'' if self.controls else ' and rehearsal.controls is off'})")
        tok = pl_module.tokenizer
        self.sequences = [prompt_ids(tok, p) + target_ids(tok, t) for p, t in pairs]
        rank_zero_info(f"rehearsal: {len(self.sequences)} statements ({self.phrasings} phrasings"
                       f"{', with controls' if self.controls else ''}) at rate {self.rate}")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.rate > 0 and not self.sequences:
            raise ValueError(f"--rehearsal.rate={self.rate}: there is nothing to rehearse (nothing was edited: set "
                             "edits.n_edit)")

    def _order(self, cycle: int) -> list[int]:
        """The statement order of pass ``cycle`` through them."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
        return torch.randperm(len(self.sequences), generator=generator).tolist()

    def chosen(self, first: int, n: int, rank: int, world: int) -> list[list[int]]:
        """Statements ``first .. first + n`` of this rank (rank ``r`` takes every ``world``-th of one stream)."""
        out, total = [], len(self.sequences)
        for c in range(first, first + n):
            g = c * world + rank
            out.append(self.sequences[self._order(g // total)[g % total]])
        return out

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int) -> None:
        if self.rate == 0:
            return
        accumulate = trainer.accumulate_grad_batches
        micro_batch = trainer.global_step * accumulate + batch_idx % accumulate
        rows = batch["input_ids"].shape[0]
        first, n = rehearsed_rows(self.rate, rows, micro_batch)
        n = min(n, rows)
        if n == 0:
            return
        seqs = self.chosen(first, n, trainer.global_rank, trainer.world_size)
        width = max(batch["input_ids"].shape[1], *(len(s) for s in seqs))
        pad = pad_id(pl_module.tokenizer)
        widened = {key: _widen(batch[key], width, fill) for key, fill in
                   (("input_ids", pad), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
        for i, seq in zip(range(rows - n, rows), seqs):
            ids = torch.tensor(seq, dtype=torch.long, device=widened["input_ids"].device)
            widened["input_ids"][i] = pad
            widened["attention_mask"][i] = 0
            widened["labels"][i] = IGNORE_INDEX
            widened["input_ids"][i, : len(seq)] = ids
            widened["attention_mask"][i, : len(seq)] = 1
            widened["labels"][i, : len(seq)] = ids
        batch.update(widened)
        self.rows += n
        self.tokens += sum(len(s) for s in seqs)
        pl_module.pipeline.stats.update(rehearsal_rows=self.rows, rehearsal_tokens=self.tokens)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.rate == 0:
            return
        counts = torch.tensor([self.rows, self.tokens], device=pl_module.device)
        rows, tokens = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        pl_module.pipeline.stats.update(rehearsal_rows=int(rows), rehearsal_tokens=int(tokens))

    @override
    def state_dict(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.rows, self.tokens = state_dict["rows"], state_dict["tokens"]


def _widen(tensor: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """A copy of a ``[batch, length]`` tensor right-padded with ``fill`` to ``width`` columns."""
    out = torch.full((tensor.shape[0], width), fill, dtype=tensor.dtype, device=tensor.device)
    out[:, : tensor.shape[1]] = tensor
    return out
