"""What each arm costs and what it does beside the edits, against the baseline arm of its grid cell: seconds,
validation loss, and the accuracy of every probe group after editing (t=0) and at the end.

The end of a run is its last measurement after fine-tuning, or, where its ``summary.json`` has an
``after_finetune`` block (an arm that edits again, or only, after fine-tuning), the measurement after that edit.

- ``costs.csv``: one row per condition and quantity (:data:`QUANTITIES`): the mean over seeds with its
  t-interval, and arm − baseline taken seed by seed with the paired t-interval (one common seed: the difference
  alone). A seed's runs (the ``single`` protocol) add their seconds and average their validation losses.
- ``accuracy.csv``: one row per condition, stage (``t0``, ``end``), protocol and group: accuracy (passing /
  probes) per seed, their mean with a t-interval, the pooled count / denominator with Wilson's interval, and
  arm − baseline at the same stage, as :func:`retention.study.results.difference` takes it (paired t over seeds,
  Newcombe's interval with one seed).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from retention.diskcache import digest
from retention.records import GROUP_LABELS, GROUPS
from retention.study.results import (
    Aggregate,
    Condition,
    Counts,
    RunResult,
    aggregates,
    by_condition_and_seed,
    difference,
)
from retention.study.stats import t_interval
from retention.study.tables import fmt, fmt_difference, fmt_interval, markdown_table

QUANTITIES = {
    "wall_s": "seconds of the whole run as it ran (study_run.json; outside a study summary.json's total_s)",
    "work_s": "edit_s + fine_tune_s + after_edit_s",
    "edit_s": "editing before fine-tuning; an edit reused from the edit cache counts what computing it cost in "
              "the run of the report that computed it",
    "fine_tune_s": "fine-tuning (measurements inside it excluded)",
    "after_edit_s": "editing after fine-tuning (after_finetune.edit_seconds; 0 without)",
    "measure_s": "measuring the probes, after_finetune.measure_seconds included",
    "val_loss_first": "validation loss before fine-tuning",
    "val_loss_last": "validation loss after fine-tuning",
}
"""The quantities of ``costs.csv``, and what each measures."""
STAGES = {"t0": 0, "end": 1}
"""Accuracy stages, as the step keys of their :class:`~retention.study.results.Aggregate`."""
EDIT_IDENTITY = ("editor", "hparams", "mode", "edit_case_ids", "augmented_phrasings", "base_fingerprint")
"""The fields of a summary's ``run`` that identify an edit (so a reused one finds the run that computed it)."""


def _edit_key(summary: Mapping) -> str:
    return digest({k: summary["run"].get(k) for k in EDIT_IDENTITY})


def _computed_edit_seconds(results: Sequence[RunResult]) -> dict[str, float]:
    """Edit identity -> the mean seconds of the runs that computed that edit (not from the cache)."""
    seconds: dict[str, list[float]] = defaultdict(list)
    for r in results:
        t = r.summary.get("timings") or {}
        if "edit_s" in t and not (r.summary["run"].get("reused") or {}).get("edit"):
            seconds[_edit_key(r.summary)].append(float(t["edit_s"]))
    return {k: sum(v) / len(v) for k, v in seconds.items()}


def _number(value) -> float:
    """A summary's number as a float; NaN where it is missing or null."""
    return math.nan if value is None else float(value)


def run_quantities(result: RunResult, computed: Mapping[str, float]) -> dict[str, float]:
    """A run's :data:`QUANTITIES` (NaN where its summary does not have them)."""
    s = result.summary
    t, after = s.get("timings") or {}, s.get("after_finetune") or {}
    downstream = s.get("downstream") or {}
    out = {k: math.nan for k in QUANTITIES}
    out["wall_s"] = result.seconds if result.seconds is not None else _number(t.get("total_s"))
    for stage in ("first", "last"):
        out[f"val_loss_{stage}"] = _number((downstream.get(stage) or {}).get("val/loss"))
    if t:
        edit = _number(t.get("edit_s", 0.0))
        if (s["run"].get("reused") or {}).get("edit"):
            edit = computed.get(_edit_key(s), edit)
        out.update(edit_s=edit, fine_tune_s=_number(t.get("fine_tune_s")),
                   after_edit_s=_number(after.get("edit_seconds", 0.0)),
                   measure_s=_number(t.get("measure_s")) + _number(after.get("measure_seconds", 0.0)))
        out["work_s"] = out["edit_s"] + out["fine_tune_s"] + out["after_edit_s"]
    return out


def _per_seed(results: Sequence[RunResult]) -> dict[Condition, dict[int, dict[str, float]]]:
    """Condition -> seed -> quantity: seconds added over the seed's runs, validation losses averaged."""
    computed = _computed_edit_seconds(results)
    out = {}
    for c, by_seed in by_condition_and_seed(results).items():
        values = {seed: [run_quantities(r, computed) for r in runs] for seed, runs in by_seed.items()}
        out[c] = {seed: {q: _combine(q, [v[q] for v in vs]) for q in QUANTITIES} for seed, vs in values.items()}
    return out


def _combine(quantity: str, values: Sequence[float]) -> float:
    """A seed's value of ``quantity`` from its runs' values: seconds add up, losses are averaged."""
    return sum(values) if quantity.endswith("_s") else sum(values) / len(values)


def _baseline(condition: Condition, conditions, baselines: Mapping[str, str]) -> Condition | None:
    base = Condition(condition.study, condition.cell, baselines.get(condition.study, ""))
    return base if base in conditions and base != condition else None


def cost_rows(results: Sequence[RunResult], baselines: Mapping[str, str]) -> list[dict]:
    """``costs.csv``: per condition and quantity, the mean over seeds and arm − baseline paired by seed."""
    per_seed = _per_seed(results)
    rows = []
    for c, by_seed in per_seed.items():
        base = _baseline(c, per_seed, baselines)
        for q in QUANTITIES:
            values = [v[q] for v in by_seed.values()]
            if all(math.isnan(x) for x in values):
                continue
            mean = t_interval(values)
            row = {"study": c.study, "cell": c.cell, "arm": c.arm, "quantity": q, "n_seeds": mean.n,
                   "mean": mean.estimate, "ci_low": mean.low, "ci_high": mean.high}
            if base is not None:
                pairs = [(by_seed[s][q], per_seed[base][s][q]) for s in by_seed if s in per_seed[base]]
                d = t_interval([a - b for a, b in pairs if not (math.isnan(a) or math.isnan(b))])
                row.update(baseline=base.arm, diff=d.estimate, diff_low=d.low, diff_high=d.high, diff_n=d.n,
                           excludes_zero=d.excludes_zero,
                           method="paired t over seeds" if d.n >= 2 else "one seed, no interval")
            rows.append(row)
    return rows


def _accuracy(summary: Mapping, stage: str) -> Mapping:
    """``{group: {protocol: Rate}}`` of a summary at t=0 or at its end (after ``after_finetune``'s edit)."""
    measurements = summary.get("measurements")
    if stage == "t0":
        return measurements[0]["accuracy"] if measurements else summary.get("t0", {})
    if summary.get("after_finetune"):
        return summary["after_finetune"]["accuracy"]
    return measurements[-1]["accuracy"] if measurements else summary.get("final_accuracy", {})


def condition_ends(results: Sequence[RunResult]) -> dict[Condition, str]:
    """What each condition's end is: ``after <mode>`` for runs with an ``after_finetune`` block, else
    ``fine-tuned`` (both, joined, where its runs differ)."""
    ends: dict[Condition, dict[str, None]] = defaultdict(dict)
    for r in results:
        after = r.summary.get("after_finetune")
        ends[r.condition][f"after {after.get('mode', 'edit')}" if after else "fine-tuned"] = None
    return {c: ", ".join(e) for c, e in ends.items()}


def _accuracy_counts(runs: list[RunResult]) -> Counts:
    """A seed's accuracy counts at the :data:`STAGES`, its runs pooled."""
    pooled: Counts = {step: {} for step in STAGES.values()}
    for r in runs:
        for stage, step in STAGES.items():
            for group, by_p in _accuracy(r.summary, stage).items():
                for p, rate in by_p.items():
                    k0, n0 = pooled[step].setdefault(group, {}).get(p, (0, 0))
                    pooled[step][group][p] = (k0 + int(rate["count"]), n0 + int(rate["denominator"]))
    return pooled


def accuracy_aggregates(results: Sequence[RunResult]) -> list[Aggregate]:
    """Per condition, each seed's accuracy counts (its runs pooled) at the :data:`STAGES`."""
    return aggregates(results, _accuracy_counts)


def accuracy_rows(aggregates: Sequence[Aggregate], ends: Mapping[Condition, str],
                  baselines: Mapping[str, str]) -> list[dict]:
    """``accuracy.csv``: per condition, stage, protocol and group, accuracy with intervals and arm − baseline."""
    index = {a.condition: a for a in aggregates}
    rows = []
    for agg in aggregates:
        c = agg.condition
        base = index.get(_baseline(c, index, baselines))
        for stage, step in STAGES.items():
            for protocol in agg.protocols():
                for group in GROUPS:
                    mean, pooled = agg.rate(step, group, protocol)
                    if pooled.n == 0:
                        continue
                    k, n = agg.pooled(step, group, protocol)
                    row = {"study": c.study, "cell": c.cell, "arm": c.arm, "stage": stage,
                           "end": ends[c] if stage == "end" else "", "protocol": protocol, "group": group,
                           "n_seeds": mean.n, "n_runs": agg.n_runs, "mean": mean.estimate, "ci_low": mean.low,
                           "ci_high": mean.high, "count": k, "denominator": n, "pooled": pooled.estimate,
                           "wilson_low": pooled.low, "wilson_high": pooled.high}
                    if base is not None and base.pooled(step, group, protocol)[1]:
                        d, method = difference(agg, base, step, step, group, group, protocol)
                        row.update(baseline=base.condition.arm, diff=d.estimate, diff_low=d.low, diff_high=d.high,
                                   diff_n=d.n, excludes_zero=d.excludes_zero, method=method)
                    rows.append(row)
    return rows


def cell_markdown(aggregates: Sequence[Aggregate], cost: Sequence[Mapping], accuracy: Sequence[Mapping],
                  base: str) -> list[str]:
    """The cost, damage and end-accuracy tables of one grid cell against its ``base`` arm: its conditions'
    accuracy aggregates (:func:`accuracy_aggregates`) and their rows of ``costs.csv`` and ``accuracy.csv``."""
    costs = {(r["arm"], r["quantity"]): r for r in cost}
    diffs = {(r["arm"], r["stage"], r["protocol"], r["group"]): r for r in accuracy}
    ends = {r["arm"]: r["end"] for r in accuracy if r["stage"] == "end"}
    lines = []
    if costs:
        header = ["arm", "wall s", "work s", f"work: arm − {base}", "val loss before → after",
                  f"val loss after: arm − {base}"]
        rows = [[a.condition.arm, *(_mean_text(costs.get((a.condition.arm, q)), d) for q, d in
                                    (("wall_s", 0), ("work_s", 0))), _diff(costs.get((a.condition.arm, "work_s")), 0),
                 f"{fmt(costs.get((a.condition.arm, 'val_loss_first'), {}).get('mean'), 3)} → "
                 f"{_mean_text(costs.get((a.condition.arm, 'val_loss_last')), 3)}",
                 _diff(costs.get((a.condition.arm, "val_loss_last")), 3)] for a in aggregates]
        lines += ["", f"**Cost against {base}.** Seconds per run, mean over seeds [95 % t-interval]; work = editing "
                  "(an edit reused from the edit cache counted at what computing it cost) + fine-tuning + editing "
                  "after fine-tuning; wall = the run as it ran. Validation loss before and after fine-tuning. "
                  "Differences paired by seed (costs.csv).", "", *markdown_table(header, rows)]
    for stage, groups, title in (
            ("t0", ("edit_neighborhood", "control"),
             f"**Damage at t=0 against {base}** (accuracy after editing, before fine-tuning: passing / probes)"),
            ("end", ("edit", "edit_paraphrase", "edit_neighborhood", "control"),
             f"**Accuracy at the end against {base}** (after fine-tuning; for arms that edit after fine-tuning, "
             "after that edit: column *end*)")):
        step = STAGES[stage]
        groups = [g for g in groups if any(a.pooled(step, g, p)[1] for a in aggregates for p in a.protocols())]
        if not groups:
            continue
        header = ["arm", *(["end"] if stage == "end" else []), "protocol"]
        for g in groups:
            header += [GROUP_LABELS[g], f"− {base}"]
        rows = []
        for a in aggregates:
            arm = a.condition.arm
            for p in a.protocols():
                cells = [arm, *([ends.get(arm, "-")] if stage == "end" else []), p]
                for g in groups:
                    cells += [a.text(step, g, p), _diff(diffs.get((arm, stage, p, g)))]
                rows.append(cells)
        lines += ["", f"{title}: mean over seeds [95 % t-interval] (pooled passing/probes); with one seed the pooled "
                  "rate [Wilson]. Differences paired by seed, Newcombe's interval with one seed (accuracy.csv).", "",
                  *markdown_table(header, rows)]
    return lines


def _diff(row: Mapping | None, digits: int = 2) -> str:
    if row is None or "diff" not in row:
        return "-"
    return fmt_difference(row["diff"], row["diff_low"], row["diff_high"], row["excludes_zero"], digits)


def _mean_text(row: Mapping | None, digits: int) -> str:
    return "-" if row is None else fmt_interval(row["mean"], row["ci_low"], row["ci_high"], digits)
