"""Intervals for retention rates: over seeds (Student t, paired t) and over probes (Wilson, Newcombe).

- Seeds are the unit of replication of a study: each seed draws its own facts, split and fine-tuning order, so
  a rate's spread over seeds holds all of that variation. With n >= 2 seeds the interval of the mean is the
  t-interval ``mean +- t(0.975, n-1) * sd / sqrt(n)``; a difference of two arms (or edited minus intrinsic) is
  taken seed by seed first (same facts, same fine-tuning data order) and the t-interval is that of the
  differences (the paired t-interval).
- A pooled count k of n probes has Wilson's score interval (Wilson 1927), which stays inside [0, 1] and behaves
  at k = 0 or k = n; a difference of two independent pooled rates has Newcombe's hybrid score interval
  (Newcombe 1998, method 10). These are what a single run or the ``single`` protocol (one seed) gets; they treat
  probes as independent, which they are not quite (probes of one fact move together), so they are narrower
  than the seed intervals.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

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
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)

    def fmt(self, digits: int = 2) -> str:
        if math.isnan(self.estimate):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.estimate:.{digits}f}"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


NAN = float("nan")


def _t_cdf_from_zero(x: float, df: int, intervals: int = 4000) -> float:
    """P(0 <= T <= x) for Student's t with ``df`` degrees of freedom (composite Simpson's rule on the density)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / intervals
    total = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, intervals))
    return total * h / 3


@functools.lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by bisection on its CDF
    (a few hundred microseconds; accurate to ~1e-7 for the levels used here). Without SciPy on purpose: the
    package adds no dependency for two numbers."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: p={p} must be in (0.5, 1) and df={df} >= 1")
    target = p - 0.5
    low, high = 0.0, 1.0
    while _t_cdf_from_zero(high, df) < target:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf_from_zero(mid, df) < target else (low, mid)
    return (low + high) / 2


def t_interval(values: Sequence[float], level: float = LEVEL,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """Mean of ``values`` (NaNs dropped) with its Student-t interval, clipped to ``bounds`` (a rate's interval
    to [0, 1], a difference of rates to [-1, 1]); no interval below two values."""
    xs = [float(v) for v in values if not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return Interval(NAN, NAN, NAN, 0)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, NAN, NAN, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, max(bounds[0], mean - half), min(bounds[1], mean + half), n)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of ``a[i] - b[i]`` over pairs where both exist (rates: within [-1, 1]), with the paired t-interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_interval: {len(a)} and {len(b)} values; pairs need equal lengths")
    return t_interval([x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))], level, (-1.0, 1.0))


def wilson(count: int, n: int, level: float = LEVEL) -> Interval:
    """``count / n`` with Wilson's score interval."""
    if n <= 0:
        return Interval(NAN, NAN, NAN, 0)
    if not 0 <= count <= n:
        raise ValueError(f"wilson: count {count} outside 0..{n}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At k = 0 (k = n) the lower (upper) bound is exactly 0 (1); the formula leaves rounding noise there.
    low = 0.0 if count == 0 else max(0.0, centre - half)
    high = 1.0 if count == n else min(1.0, centre + half)
    return Interval(p, low, high, n)


def newcombe(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> Interval:
    """``k1/n1 - k2/n2`` for independent samples with Newcombe's hybrid score interval."""
    a, b = wilson(k1, n1, level), wilson(k2, n2, level)
    if a.n == 0 or b.n == 0:
        return Interval(NAN, NAN, NAN, 0)
    d = a.estimate - b.estimate
    low = d - math.sqrt((a.estimate - a.low) ** 2 + (b.high - b.estimate) ** 2)
    high = d + math.sqrt((a.high - a.estimate) ** 2 + (b.estimate - b.low) ** 2)
    return Interval(d, low, high, min(n1, n2))
