"""Edited against intrinsic retention, matched on t=0 confidence: within quantile bins of the t=0 target
log-prob or margin, Wilson intervals per set and bin, Newcombe's interval for the difference
(:mod:`retention.study.stats`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from retention.study.analysis.facts import SETS, Fact, by_condition, protocols_of
from retention.study.stats import LEVEL, newcombe, wilson

MATCH_BY = ("target_logprob_t0", "margin_t0")
"""The t=0 features whose quantile bins match edited and intrinsic facts."""


def quantile_edges(values: Sequence[float], bins: int) -> list[float]:
    """Edges of up to ``bins`` quantile bins (repeated quantiles merged).

    >>> quantile_edges([1, 2, 3, 4, 5], 2), quantile_edges([1, 1, 1], 4)
    ([1.0, 3.0, 5.0], [1.0, 1.0])
    """
    xs = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if not len(xs):
        return []
    edges = list(dict.fromkeys(float(q) for q in np.quantile(xs, np.linspace(0, 1, bins + 1))))
    return edges if len(edges) > 1 else [edges[0], edges[0]]


def matched_rows(facts: Sequence[Fact], bins: int = 4, level: float = LEVEL) -> list[dict]:
    """Edited vs intrinsic retention within quantile bins of the t=0 target log-prob and of the t=0 margin
    (bins over both sets' facts passing at t=0, per condition and protocol), plus all facts unbinned."""
    rows = []
    for (study, cell, arm), group in by_condition(facts).items():
        for protocol in protocols_of(group):
            at_risk = [(f, kept) for f in group if (kept := f.kept_final(protocol)) is not None]
            if not at_risk:
                continue
            for by in MATCH_BY:
                values = [float(f.features.get(by, math.nan)) for f, _ in at_risk]
                edges = quantile_edges(values, bins)
                members: dict[str, list[tuple[Fact, bool]]] = defaultdict(list)
                for (f, kept), v in zip(at_risk, values):
                    if edges and not math.isnan(v):  # bin i: edges[i] <= v < edges[i + 1]; the last one closed
                        i = min(int(np.searchsorted(edges, v, side="right")) - 1, len(edges) - 2)
                        members[str(i + 1)].append((f, kept))
                spans = {str(i + 1): (edges[i], edges[i + 1]) for i in range(len(edges) - 1)}
                spans["all"] = (-math.inf, math.inf)
                members["all"] = at_risk
                for label, (lo, hi) in spans.items():
                    inside = members.get(label, [])
                    k = {name: sum(kept for f, kept in inside if f.set == name) for name in SETS}
                    n = {name: sum(1 for f, _ in inside if f.set == name) for name in SETS}
                    e, r = wilson(k["edited"], n["edited"], level), wilson(k["intrinsic"], n["intrinsic"], level)
                    d = newcombe(k["edited"], n["edited"], k["intrinsic"], n["intrinsic"], level)
                    rows.append({"study": study, "cell": cell, "arm": arm, "protocol": protocol, "by": by,
                                 "bin": label, "low": lo, "high": hi,
                                 "edited_kept": k["edited"], "edited_n": n["edited"],
                                 "edited_rate": e.estimate, "edited_low": e.low, "edited_high": e.high,
                                 "intrinsic_kept": k["intrinsic"], "intrinsic_n": n["intrinsic"],
                                 "intrinsic_rate": r.estimate, "intrinsic_low": r.low, "intrinsic_high": r.high,
                                 "difference": d.estimate, "diff_low": d.low, "diff_high": d.high,
                                 "excludes_zero": d.excludes_zero})
    return rows
