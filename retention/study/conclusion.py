"""The report's conclusion: what the final retention is, and which differences the intervals settle.

Generated from the rows of ``report.csv`` and ``comparisons.csv`` (:func:`retention.study.report.rate_rows` and
:func:`retention.study.report.comparisons`, as dicts or as read back from the CSV files), never written by hand:
which differences' intervals exclude 0, which are 0 in every seed, which are inconclusive and how wide their
intervals are, and how many would exclude 0 by chance alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from retention.records import GROUP_LABELS

HEADING = "## What the intervals show"
LISTED = 6
"""Differences named one by one; the rest are counted."""
LEVEL = 0.95


def _number(value: Any) -> float:
    """A CSV field or a row value as a float (an empty field is NaN)."""
    return float(value) if value not in ("", None) else math.nan


def _true(value: Any) -> bool:
    return value is True or value == "True"


def _name(row: Mapping[str, Any], one_study: bool) -> str:
    """``editor=rome, freeze_window, top1: E − I``: what a comparison row compares, as short as it stays clear."""
    where = [row["study"]] if not one_study and row["study"] != row["arm"] else []  # a run folder: study = arm
    where += [row["cell"]] if row["cell"] != "all" else []
    if row["comparison"] == "edited - intrinsic":
        what = f"{row['arm']}: E − I"
    else:
        base = row["comparison"].removeprefix("arm - ")
        what = f"{row['arm']} − {base}, {GROUP_LABELS.get(row['group'], row['group'])}"
    return ", ".join([*where, f"{what} ({row['protocol']})"])


def _interval(row: Mapping[str, Any]) -> str:
    return f"{_number(row['estimate']):+.2f} [{_number(row['ci_low']):+.2f}, {_number(row['ci_high']):+.2f}]"


def _span(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}–{high}"


def _final_rates(rates: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per protocol, the range over conditions of final edited and intrinsic retention."""
    spans: dict[str, dict[str, list[float]]] = {}
    conditions = set()
    for row in rates:
        if not _true(row["final"]) or row["group"] not in ("edit", "control"):
            continue
        value = _number(row["mean"]) if int(row["n_seeds"]) >= 2 else _number(row["pooled"])
        if math.isfinite(value):
            spans.setdefault(row["protocol"], {}).setdefault(row["group"], []).append(value)
            conditions.add((row["study"], row["cell"], row["arm"]))
    if not spans:
        return []
    parts = [f"`{p}` " + ", ".join(f"{GROUP_LABELS[g].split(' ')[0]} {_span(v)}" for g, v in by_group.items())
             for p, by_group in spans.items()]
    return [f"- Final retention over the {len(conditions)} condition(s): " + "; ".join(parts) + "."]


def conclusion(rates: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """The conclusion section (Markdown lines, :data:`HEADING` first) of a report's rate and comparison rows."""
    lines = [HEADING, "", *_final_rates(rates)]
    comparisons = [r for r in comparisons if int(r["n"]) > 0]  # a group without probes: nothing compared
    if not comparisons:
        return lines + ["- No differences could be computed (no two groups or arms with probes passing at t=0)."]
    one_study = len({r["study"] for r in comparisons}) == 1
    kinds: dict[str, list[Mapping[str, Any]]] = {"excluding": [], "zero": [], "open": [], "unestimated": []}
    for r in comparisons:
        estimate, low, high = (_number(r[k]) for k in ("estimate", "ci_low", "ci_high"))
        kind = ("unestimated" if math.isnan(estimate) or math.isnan(low) else "excluding" if _true(r["excludes_zero"])
                else "zero" if estimate == low == high == 0 else "open")
        kinds[kind].append(r)
    excluding, zero, open_, unestimated = kinds.values()
    sizes: dict[str, list[int]] = {}
    for r in comparisons:
        sizes.setdefault(r["method"], []).append(int(r["n"]))
    methods = "; ".join(f"{m}, n = {_span(v, '{:d}')}" for m, v in sorted(sizes.items()))
    n, k = len(comparisons), len(excluding)
    lines.append(f"- {n} differences at the final step ({methods}); {k} of them {'has' if k == 1 else 'have'} a "
                 f"{LEVEL:.0%} interval that excludes 0" + (":" if excluding else "."))
    for row in sorted(excluding, key=lambda r: -abs(_number(r["estimate"])))[:LISTED]:
        lines.append(f"  - {_name(row, one_study)} {_interval(row)}")
    if k > LISTED:
        lines.append(f"  - and {k - LISTED} more (comparisons.csv, excludes_zero)")
    if zero:
        lines.append(f"- {len(zero)} are 0 in every seed (a zero-width interval at 0): no seed shows a difference.")
    if open_:
        half = [(_number(r["ci_high"]) - _number(r["ci_low"])) / 2 for r in open_]
        lines.append(f"- {len(open_)} include 0 and are inconclusive: their half-widths run from {min(half):.2f} to "
                     f"{max(half):.2f} (median {statistics.median(half):.2f}), so differences that large either way "
                     "are not ruled out; an interval that includes 0 is not evidence of no difference.")
    if unestimated:
        lines.append(f"- {len(unestimated)} have no interval (a seed without probes passing at t=0).")
    chance = n * (1 - LEVEL)
    does = f"{k} {'does' if k == 1 else 'do'}"
    found = ("none does" if not k else f"{does}, more than chance gives" if k > chance
             else f"{does}, no more than chance gives: leads to replicate, not findings")
    lines.append(f"- Each interval is {LEVEL:.0%} on its own: of {n} differences, about {chance:.1f} would exclude 0 "
                 f"by chance alone if nothing differed; {found}.")
    return lines
