"""Intervals for retention rates: over seeds (Student t, paired t) and over probes (Wilson, Newcombe).

- Seeds are the unit of replication of a study: each seed draws its own facts, split and fine-tuning order, so
  a rate's spread over seeds holds all of that variation. With n >= 2 seeds the interval of the mean is the
  t-interval ``mean +- t(0.975, n-1) * sd / sqrt(n)`` (``scipy.stats.ttest_1samp(...).confidence_interval``);
  a difference of two arms (or edited minus intrinsic) is taken seed by seed first (same facts, same
  fine-tuning data order) and the t-interval is that of the differences (the paired t-interval).
- A pooled count k of n probes has Wilson's score interval (Wilson 1927; statsmodels' ``proportion_confint``,
  ``method="wilson"``), which stays inside [0, 1] and behaves at k = 0 or k = n; a difference of two
  independent pooled rates has Newcombe's hybrid score interval (Newcombe 1998, method 10; statsmodels'
  ``confint_proportions_2indep``, ``method="newcomb"``). These are what a single run or the ``single``
  protocol (one seed) gets; they treat probes as independent, which they are not quite (probes of one fact
  move together), so they are narrower than the seed intervals.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval; ``n`` is the number of seeds or probes behind it."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below zero."""
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)

    def fmt(self, digits: int = 2) -> str:
        """``est [low, high]``, the estimate alone without an interval, ``n/a`` without an estimate."""
        if math.isnan(self.estimate):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.estimate:.{digits}f}"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


NAN = float("nan")


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: p={p} must be in (0.5, 1) and df={df} >= 1")
    return float(stats.t.ppf(p, df))


def t_interval(values: Sequence[float], level: float = LEVEL,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """Mean of ``values`` (NaNs dropped) with its Student-t interval, clipped to ``bounds`` (a rate's interval
    to [0, 1], a difference of rates to [-1, 1]); no interval below two values.

    >>> t_interval([0.8, 0.9, 0.7], bounds=(0.0, 1.0)).fmt(), t_interval([0.8]).fmt()
    ('0.80 [0.55, 1.00]', '0.80')
    """
    xs = [float(v) for v in values if not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return Interval(NAN, NAN, NAN, 0)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, NAN, NAN, n)
    with warnings.catch_warnings():  # equal values (every seed kept everything) warn of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(xs, 0.0).confidence_interval(level)
    return Interval(mean, max(bounds[0], float(ci.low)), min(bounds[1], float(ci.high)), n)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of ``a[i] - b[i]`` over pairs where both exist (rates: within [-1, 1]), with the paired t-interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_interval: {len(a)} and {len(b)} values; pairs need equal lengths")
    return t_interval([x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))], level, (-1.0, 1.0))


def wilson(count: int, n: int, level: float = LEVEL) -> Interval:
    """``count / n`` with Wilson's score interval.

    >>> wilson(8, 10).fmt(), wilson(0, 10).fmt()
    ('0.80 [0.49, 0.94]', '0.00 [0.00, 0.28]')
    """
    if n <= 0:
        return Interval(NAN, NAN, NAN, 0)
    if not 0 <= count <= n:
        raise ValueError(f"wilson: count {count} outside 0..{n}")
    low, high = proportion_confint(count, n, alpha=1 - level, method="wilson")
    # At k = 0 (k = n) the lower (upper) bound is exactly 0 (1); the formula can leave rounding noise there.
    low = 0.0 if count == 0 else max(0.0, float(low))
    high = 1.0 if count == n else min(1.0, float(high))
    return Interval(count / n, low, high, n)


def newcombe(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> Interval:
    """``k1/n1 - k2/n2`` for independent samples with Newcombe's hybrid score interval.

    >>> newcombe(8, 10, 5, 10).fmt()
    '0.30 [-0.11, 0.60]'
    """
    if n1 <= 0 or n2 <= 0:
        return Interval(NAN, NAN, NAN, 0)
    for k, n in ((k1, n1), (k2, n2)):
        if not 0 <= k <= n:
            raise ValueError(f"newcombe: count {k} outside 0..{n}")
    low, high = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff", alpha=1 - level)
    return Interval(k1 / n1 - k2 / n2, float(low), float(high), min(n1, n2))
