"""Accuracy, retention and flip ratio of probe sets: a functional core and one torchmetrics class (definitions:
docs/design.md).

Every number is a count over probes scored under one protocol. Retention of a set from model A (t=0, after
editing, before fine-tuning) to model B is ``|{x : p(A,x) ∧ p(B,x)}| / |{x : p(A,x)}|``, always reported with
its denominator (a :class:`Rate`); the edit flip ratio (arXiv 2511.05852) is ``1 − retention`` on the edit set.

:class:`ProbeCounts` keeps every count of a measurement — per probe group, per protocol: scored, passing, passing
at t=0, kept — in one integer state summed over ranks. Under DDP each rank updates with its own disjoint shard
of probes and ``compute()`` (which every rank must call) gives the totals, without double counting, with one
all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import torch
from torch import Tensor
from torchmetrics import Metric

from retention.distributed import all_reduce_sum

COUNTS = ("scored", "passed", "passed_t0", "kept")
"""The rows of :func:`probe_counts`: probes scored, passing now, passing at t=0, passing at t=0 and now."""


class Rate(TypedDict):
    """A rate with what it counts: ``value`` is ``count / denominator``, NaN when the denominator is 0."""

    value: float
    count: int
    denominator: int


Rates = dict[str, dict[str, dict[str, Rate]]]
"""``{"accuracy"|"retention": {group: {protocol: Rate}}}``: one measurement of the probe sets."""


def ratio(numerator: int | Tensor, denominator: int | Tensor) -> float:
    """``numerator / denominator`` as a float, NaN for an empty denominator (nothing to measure)."""
    den = int(denominator)
    return float(int(numerator)) / den if den else math.nan


def rate(count: int | Tensor, denominator: int | Tensor) -> Rate:
    return {"value": ratio(count, denominator), "count": int(count), "denominator": int(denominator)}


def flip_ratio(retention: Rate) -> float:
    """Cheng et al.'s edit flip ratio from the edit set's retention: the fraction of probes passing at t=0 that
    now fail (``1 − retention``); NaN when none passed at t=0."""
    return 1.0 - retention["value"]


def probe_counts(group: Tensor, before: Tensor, after: Tensor, scored: Tensor, n_groups: int) -> Tensor:
    """The ``[len(COUNTS), n_groups, protocols]`` counts of ``N`` probes.

    Args:
        group: ``[N]`` each probe's group index, below ``n_groups``.
        before: ``[N, protocols]`` outcomes at t=0.
        after: ``[N, protocols]`` outcomes now (the same probes in the same order).
        scored: ``[N, protocols]`` whether the probe has an outcome under the protocol (``prob`` needs an
            alternative); unscored entries count nowhere.
    """
    before, after, scored = (torch.as_tensor(x, dtype=torch.bool) for x in (before, after, scored))
    group = torch.as_tensor(group, dtype=torch.long)
    if not before.shape == after.shape == scored.shape or before.ndim != 2 or group.shape != before.shape[:1]:
        raise ValueError(f"probe_counts: group {tuple(group.shape)}, before {tuple(before.shape)}, after "
                         f"{tuple(after.shape)} and scored {tuple(scored.shape)} must be [N] and [N, protocols]")
    passed, passed_t0 = after & scored, before & scored
    per_probe = torch.stack([scored, passed, passed_t0, passed & passed_t0]).long()  # [COUNTS, N, protocols]
    counts = torch.zeros(len(COUNTS), n_groups, before.shape[1], dtype=torch.long)
    return counts.index_add_(1, group, per_probe)


def count_rates(counts: Tensor, groups: Sequence[str], protocols: Sequence[str]) -> Rates:
    """The rates of :func:`probe_counts`' counts: accuracy (passing / scored) and retention (kept / passing at
    t=0), per group and protocol in the given orders."""
    scored, passed, passed_t0, kept = counts.tolist()
    return {
        "accuracy": {g: {p: rate(passed[i][j], scored[i][j]) for j, p in enumerate(protocols)}
                     for i, g in enumerate(groups)},
        "retention": {g: {p: rate(kept[i][j], passed_t0[i][j]) for j, p in enumerate(protocols)}
                      for i, g in enumerate(groups)},
    }


class ProbeCounts(Metric):
    """Accuracy and retention vs t=0 of every probe group under every protocol, from one count state.

    The state ``counts`` (``[len(COUNTS), groups, protocols]``, :func:`probe_counts`) is reduced by ``sum`` and
    synced with one all-reduce (:func:`retention.distributed.all_reduce_sum`) instead of torchmetrics' gathering
    of every state from every rank. ``compute()`` returns the summed counts; :meth:`rates` their rates.
    """

    is_differentiable = False
    higher_is_better = None  # counts: the direction depends on the row
    full_state_update = False
    counts: Tensor

    def __init__(self, groups: Sequence[str], protocols: Sequence[str], **kwargs):
        kwargs.setdefault("dist_sync_fn", all_reduce_sum)
        super().__init__(**kwargs)
        self.groups, self.protocols = tuple(groups), tuple(protocols)
        shape = (len(COUNTS), len(self.groups), len(self.protocols))
        self.add_state("counts", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, group: Tensor, before: Tensor, after: Tensor, scored: Tensor) -> None:
        """Add probes (this rank's shard): the arguments of :func:`probe_counts`."""
        self.counts = self.counts + probe_counts(group, before, after, scored, len(self.groups)).to(self.device)

    def compute(self) -> Tensor:
        return self.counts

    def rates(self) -> Rates:
        """:func:`count_rates` of ``compute()``; like it, every rank must call it."""
        return count_rates(self.compute(), self.groups, self.protocols)
