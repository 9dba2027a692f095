"""Survival of facts: Kaplan–Meier curves per condition, protocol and fact set, and the log-rank test of edited
against intrinsic facts.

Kaplan–Meier (1958) of the loss steps, pooled over the runs and seeds of a condition (``scipy.stats.ecdf`` on
``scipy.stats.CensoredData``), with Greenwood's (1926) variance and the log-log interval (Kalbfleisch &
Prentice 1980: ``S ** exp(+-z * se)`` with ``se = sqrt(sum d / (n (n - d))) / |log S|``; R's ``conf.type =
"log-log"``, SciPy's ``confidence_interval(method="log-log")``); the log-rank test is Mantel's (1966;
``scipy.stats.logrank``). Facts are treated as independent, which facts of one run are not quite (they share
the fine-tuning), so the intervals are narrower than a seed-level interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from retention.study.analysis.facts import SETS, Fact, by_condition, protocols_of
from retention.study.stats import LEVEL


@dataclass(frozen=True)
class KMStep:
    """The Kaplan–Meier estimate just after ``step``."""

    step: int
    at_risk: int
    events: int
    censored: int
    survival: float
    se: float
    """Greenwood's standard error of the survival."""
    low: float
    high: float
    """The log-log interval (``low == high == survival`` where it is 1 or 0)."""


def kaplan_meier(times: Sequence[int], lost: Sequence[bool], level: float = LEVEL) -> list[KMStep]:
    """Kaplan–Meier survival at t=0 and at every step where a fact was lost or censored (events before
    censorings at a shared step; ``scipy.stats.ecdf``), with Greenwood's standard error and the log-log
    interval.

    >>> curve = kaplan_meier([10, 20, 20, 30], [True, True, False, False])
    >>> [(k.step, k.at_risk, k.events, k.survival) for k in curve]
    [(0, 4, 0, 1.0), (10, 4, 1, 0.75), (20, 3, 1, 0.5), (30, 1, 0, 0.5)]
    >>> print(f"{curve[-1].low:.3f} {curve[-1].high:.3f}")
    0.058 0.845
    """
    if len(times) != len(lost):
        raise ValueError(f"kaplan_meier: {len(times)} times and {len(lost)} event flags")
    t, e = np.asarray(times, dtype=float), np.asarray(lost, dtype=bool)
    out = [KMStep(0, len(t), 0, 0, 1.0, 0.0, 1.0, 1.0)]
    if not len(t):
        return out
    sf = stats.ecdf(stats.CensoredData(uncensored=t[e], right=t[~e])).sf
    with warnings.catch_warnings():  # NaN where S is 0 or 1; the interval is the point there (below)
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = sf.confidence_interval(level, method="log-log")
    at_risk = np.array([(t >= q).sum() for q in sf.quantiles])
    events = np.array([(e & (t == q)).sum() for q in sf.quantiles])
    # SciPy does not expose Greenwood's variance, only intervals built on it; infinite once S reaches 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(np.where(events > 0, events / (at_risk * (at_risk - events)), 0.0))
    for i, q in enumerate(sf.quantiles):
        s = float(sf.probabilities[i])
        low, high = (float(ci.low.probabilities[i]), float(ci.high.probabilities[i])) if 0 < s < 1 else (s, s)
        se = s * math.sqrt(greenwood[i]) if math.isfinite(greenwood[i]) else 0.0
        step = KMStep(int(q), int(at_risk[i]), int(events[i]), int((~e & (t == q)).sum()), s, se, low, high)
        if q == 0:
            out[0] = step
        else:
            out.append(step)
    return out


def logrank(times_a: Sequence[int], lost_a: Sequence[bool], times_b: Sequence[int],
            lost_b: Sequence[bool]) -> tuple[float, float]:
    """The log-rank test of two samples (Mantel 1966; ``scipy.stats.logrank``): (chi-square with 1 degree of
    freedom, p-value); NaN when no fact was lost or a sample is empty.

    >>> chi2, p = logrank([10, 20, 30], [True, True, False], [30, 30, 30], [False, False, False])
    >>> print(f"{chi2:.3f} {p:.3f}")
    2.469 0.116
    """
    if not len(times_a) or not len(times_b) or not (any(lost_a) or any(lost_b)):
        return math.nan, math.nan
    samples = []
    for times, lost in ((times_a, lost_a), (times_b, lost_b)):
        t, e = np.asarray(times, dtype=float), np.asarray(lost, dtype=bool)
        samples.append(stats.CensoredData(uncensored=t[e], right=t[~e]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance (every fact lost at once)
        res = stats.logrank(*samples)
    if not math.isfinite(res.statistic):
        return math.nan, math.nan
    return float(res.statistic) ** 2, float(res.pvalue)


def survival_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """Kaplan–Meier curves per condition, protocol and set (survival.csv)."""
    rows = []
    for (study, cell, arm), group in by_condition(facts).items():
        for protocol in protocols_of(group):
            for name in SETS:
                outcomes = [o for f in group if f.set == name and (o := f.outcome(protocol)) is not None]
                if not outcomes:
                    continue
                runs = len({f.run for f in group if f.set == name})
                for k in kaplan_meier([t for t, _ in outcomes], [e for _, e in outcomes], level):
                    rows.append({"study": study, "cell": cell, "arm": arm, "protocol": protocol, "set": name,
                                 "step": k.step, "at_risk": k.at_risk, "lost": k.events, "censored": k.censored,
                                 "survival": k.survival, "se": k.se, "ci_low": k.low, "ci_high": k.high,
                                 "n_facts": len(outcomes), "n_runs": runs})
    return rows


def logrank_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """Per condition and protocol: each set's facts at risk, losses and Kaplan–Meier survival at its last step
    (log-log interval), and the log-rank test of edited against intrinsic."""
    rows = []
    for (study, cell, arm), group in by_condition(facts).items():
        for protocol in protocols_of(group):
            row: dict[str, Any] = {"study": study, "cell": cell, "arm": arm, "protocol": protocol}
            sides = {}
            for name in SETS:
                outcomes = [o for f in group if f.set == name and (o := f.outcome(protocol)) is not None]
                sides[name] = ([t for t, _ in outcomes], [e for _, e in outcomes])
                km = kaplan_meier(*sides[name], level)[-1] if outcomes else None
                row.update({f"{name}_facts": len(outcomes), f"{name}_lost": sum(sides[name][1]),
                            f"{name}_survival": km.survival if km else math.nan,
                            f"{name}_low": km.low if km else math.nan, f"{name}_high": km.high if km else math.nan})
            if not any(row[f"{name}_facts"] for name in SETS):
                continue
            chi2, p = logrank(*sides["edited"], *sides["intrinsic"])
            rows.append({**row, "logrank_chi2": chi2, "logrank_p": p})
    return rows
