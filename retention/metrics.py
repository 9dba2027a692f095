"""Edit success, retention and flip ratio: a functional core and torchmetrics classes (definitions:
docs/design.md).

Every number is a count over probes scored under one protocol. Retention of a set from model A (t=0, after
editing, before fine-tuning) to model B is ``|{x : p(A,x) ∧ p(B,x)}| / |{x : p(A,x)}|``, always reported with
its denominator; the edit flip ratio (arXiv 2511.05852) is ``1 − retention`` on the edit set.

The metric states are counts reduced by ``sum``, so under DDP each rank updates with its own disjoint shard of
probes and ``compute()`` (which every rank must call) gives the totals without double counting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

Outcomes = Tensor | Sequence[bool]


def _as_bool(x: Outcomes) -> Tensor:
    return torch.as_tensor(x, dtype=torch.bool).reshape(-1)


def ratio(numerator: int | Tensor, denominator: int | Tensor) -> float:
    """``numerator / denominator`` as a float, NaN for an empty denominator (nothing to measure)."""
    den = int(denominator)
    return float(int(numerator)) / den if den else math.nan


def edit_success(passed: Outcomes) -> tuple[Tensor, Tensor]:
    """``(passed, total)``: how many probes pass and how many were scored."""
    p = _as_bool(passed)
    return p.sum(), torch.tensor(p.numel())


def retention(before: Outcomes, after: Outcomes) -> tuple[Tensor, Tensor]:
    """``(kept, denominator)``: probes passing before and after, and probes passing before."""
    b, a = _as_bool(before), _as_bool(after)
    if b.shape != a.shape:
        raise ValueError(f"retention: before has {b.numel()} outcomes, after has {a.numel()}")
    return (b & a).sum(), b.sum()


def flip_ratio(before: Outcomes, after: Outcomes) -> float:
    """The fraction of probes passing before that fail after (``1 − retention``); NaN when none passed."""
    kept, den = retention(before, after)
    return 1.0 - ratio(kept, den)


class _CountMetric(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, numerator: str, denominator: str, **kwargs):
        super().__init__(**kwargs)
        self._names = (numerator, denominator)
        self.add_state(numerator, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(denominator, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, num: Tensor, den: Tensor) -> None:
        n, d = self._names
        setattr(self, n, getattr(self, n) + num.to(self.device))
        setattr(self, d, getattr(self, d) + den.to(self.device))

    def counts(self) -> tuple[int, int]:
        """The synced ``(numerator, denominator)``; like ``compute()``, every rank must call it."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            n, d = self._names
            return int(getattr(self, n)), int(getattr(self, d))

    def compute(self) -> Tensor:
        n, d = self._names
        return torch.tensor(ratio(getattr(self, n), getattr(self, d)), dtype=torch.float64)


class EditSuccess(_CountMetric):
    """The fraction of probes that pass (edit success at t=0, or the accuracy of any probe set now)."""

    def __init__(self, **kwargs):
        super().__init__("passed", "total", **kwargs)

    def update(self, passed: Outcomes) -> None:
        self._add(*edit_success(passed))


class Retention(_CountMetric):
    """The fraction of probes passing at t=0 that still pass; its denominator is ``counts()[1]``."""

    def __init__(self, **kwargs):
        super().__init__("kept", "denominator", **kwargs)

    def update(self, before: Outcomes, after: Outcomes) -> None:
        self._add(*retention(before, after))


class FlipRatio(Retention):
    """``1 − retention``: the fraction of probes passing at t=0 that now fail."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return 1.0 - super().compute()
