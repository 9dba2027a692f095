"""Dose–response: retention against each numeric grid axis of a study, with a logistic trend, and retention at
every measured step along fine-tuning.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from retention.study.analysis.facts import SETS, Fact, by_condition, protocols_of
from retention.study.analysis.regression import logistic_regression
from retention.study.spec import cell_label
from retention.study.stats import LEVEL, wilson


def _cell_parts(cell: str) -> dict[str, str]:
    """A grid cell's label (:func:`retention.study.spec.cell_label`: ``axis=value, axis=value``) as a mapping."""
    return dict(part.split("=", 1) for part in cell.split(", ") if "=" in part)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def dose_rows(facts: Sequence[Fact], min_levels: int = 3, level: float = LEVEL) -> list[dict]:
    """Retention against each numeric grid axis of a study with at least ``min_levels`` values (K, n_edit,
    ...): per value, series (the cell's other grid values), arm, protocol and set, the facts passing at t=0
    and at the last step (Wilson interval), pooled over seeds; ``trend`` rows give the logistic slope of
    'kept' on the dose within each series (per unit of the dose, Wald interval clustered by case id: a fact
    recurs at every dose of its seed)."""
    rows = []
    by_study: dict[str, list[Fact]] = defaultdict(list)
    for f in facts:
        by_study[f.study].append(f)
    for study, group in by_study.items():
        parts = {c: _cell_parts(c) for c in {f.cell for f in group}}
        for key in sorted({k for p in parts.values() for k in p}):
            values = {p[key] for p in parts.values() if key in p}
            if len(values) < min_levels or any(_number(v) is None for v in values):
                continue
            kept: dict[tuple, list[tuple[float, bool, str]]] = defaultdict(list)
            runs: dict[tuple, set] = defaultdict(set)
            for f in group:
                cell = parts[f.cell]
                if key not in cell:
                    continue
                series = cell_label([(k, v) for k, v in cell.items() if k != key])
                for protocol in f.passed:
                    if (k := f.kept_final(protocol)) is not None:
                        point = (float(_number(cell[key])), k, f.case_id)
                        kept[(series, f.arm, protocol, f.set)].append(point)
                        runs[(series, f.arm, protocol, f.set, float(_number(cell[key])))].add(f.run)
            for (series, arm, protocol, name), points in sorted(kept.items()):
                base = {"study": study, "dose": key, "series": series, "arm": arm, "protocol": protocol, "set": name}
                for x in sorted({x for x, _, _ in points}):
                    k = sum(y for v, y, _ in points if v == x)
                    n = sum(1 for v, _, _ in points if v == x)
                    w = wilson(k, n, level)
                    rows.append({**base, "value": x, "kept": k, "n": n, "runs": len(runs[(series, arm, protocol,
                                 name, x)]), "rate": w.estimate, "low": w.low, "high": w.high})
                fit = logistic_regression(np.array([[x] for x, _, _ in points]),
                                          np.array([float(y) for _, y, _ in points]), [key], level=level,
                                          groups=[c for _, _, c in points])
                slope = [c for c in fit.coefficients if c.name == key]
                rows.append({**base, "value": "trend", "kept": fit.events, "n": fit.n, "runs": math.nan,
                             "rate": slope[0].estimate if slope and not fit.separated else math.nan,
                             "low": slope[0].low if slope else math.nan, "high": slope[0].high if slope else math.nan})
    return rows


def curve_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """Retention at every measured step (of the facts passing at t=0, those passing at that step; Wilson) per
    condition, protocol and set, with the tokens seen by then (``tokens_per_step`` x step, when known)."""
    rows = []
    for (study, cell, arm), group in by_condition(facts).items():
        for protocol in protocols_of(group):
            for name in SETS:
                mine = [f for f in group if f.set == name and f.passed.get(protocol, (None,))[0] is True]
                per_step: dict[int, list[int]] = defaultdict(lambda: [0, 0])
                for f in mine:
                    for step, ok in zip(f.steps, f.passed[protocol]):
                        if ok is not None:
                            per_step[step][0] += ok is True
                            per_step[step][1] += 1
                tps = next((f.features.get("tokens_per_step", math.nan) for f in mine), math.nan)
                for step, (k, n) in sorted(per_step.items()):
                    w = wilson(k, n, level)
                    rows.append({"study": study, "cell": cell, "arm": arm, "protocol": protocol, "set": name,
                                 "step": step, "tokens": step * tps, "passing": k, "at_risk": n,
                                 "rate": w.estimate, "low": w.low, "high": w.high})
    return rows
