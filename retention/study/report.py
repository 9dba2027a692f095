"""``retention report``: retention over seeds with intervals, edited vs intrinsic and every arm vs the baseline,
from study folders or single run folders.

Per condition (study, grid cell, arm), protocol, probe group and measured step: the rate of each seed (the
counts of a seed's runs pooled: under the ``single`` protocol a seed has one run per fact), their mean with a
t-interval over seeds, and the pooled count / denominator with Wilson's interval. At the final step: edited
minus intrinsic per arm and each arm minus the baseline arm, paired by seed (paired t-interval) when there are
two seeds or more, else from the pooled counts (Newcombe's interval). See :mod:`retention.study.stats`.

Outputs (atomically): ``report.md``, ``report.csv`` (one row per condition x protocol x group x step),
``comparisons.csv``, ``costs.csv`` and ``accuracy.csv`` (seconds, validation loss, and accuracy at t=0 and at
the end, each arm against the baseline: :mod:`retention.study.costs`), ``curves_<cell>.png`` (retention against steps, edited and intrinsic side by side, with
interval bands) and ``final_retention.png`` (final retention per arm with intervals).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from retention.io import atomic_write_text, safe_name
from retention.provenance import describe
from retention.records import GROUP_LABELS, GROUPS
from retention.study.conclusion import conclusion
from retention.study.costs import accuracy_aggregates, accuracy_rows, cell_markdown, condition_ends, cost_rows
from retention.study.figures import plot_final, plot_report_curves
from retention.study.results import (  # noqa: F401 (Aggregate, aggregate, ReportError: callers import them from here)
    Aggregate,
    Condition,
    ReportError,
    RunResult,
    aggregate,
    difference,
    load_results,
    provenance_groups,
)
from retention.study.stats import Interval
from retention.study.tables import csv_text, fmt_difference

log = logging.getLogger(__name__)

COMPARED_GROUPS = ("edit", "control", "edit_paraphrase")


def provenance_markdown(results: Sequence[RunResult]) -> list[str]:
    """The report's provenance section: each group of runs and what produced it."""
    lines = ["## Provenance", ""]
    for runs in provenance_groups(results).values():
        studies = sorted({r.condition.study for r in runs})
        lines.append(f"- {len(runs)} run(s) of {', '.join(studies)}: {describe(runs[0].summary.get('provenance'))}")
    return lines + [""]


def comparisons(aggregates: Sequence[Aggregate], baselines: dict[str, str]) -> list[dict]:
    """Edited minus intrinsic per condition, and each arm minus its cell's baseline arm, at the final step."""
    rows = []
    index = {(a.condition.study, a.condition.cell, a.condition.arm): a for a in aggregates}
    for agg in aggregates:
        c, step = agg.condition, agg.final_step
        for protocol in agg.protocols():
            diff, method = difference(agg, agg, step, step, "edit", "control", protocol)
            rows.append(_comparison_row(c, protocol, "edited - intrinsic", "edit-control", step, diff, method))
            base = index.get((c.study, c.cell, baselines.get(c.study, "")))
            if base is None or base is agg:
                continue
            for group in COMPARED_GROUPS:
                diff, method = difference(agg, base, step, base.final_step, group, group, protocol)
                rows.append(_comparison_row(c, protocol, f"arm - {base.condition.arm}", group, step, diff, method))
    return rows


def _comparison_row(c: Condition, protocol: str, comparison: str, group: str, step: int, d: Interval,
                    method: str) -> dict:
    return {"study": c.study, "cell": c.cell, "arm": c.arm, "protocol": protocol, "comparison": comparison,
            "group": group, "step": step, "n": d.n, "estimate": d.estimate, "ci_low": d.low, "ci_high": d.high,
            "excludes_zero": d.excludes_zero, "method": method}


def rate_rows(aggregates: Sequence[Aggregate]) -> list[dict]:
    """report.csv: one row per condition, protocol, group and step."""
    rows = []
    for agg in aggregates:
        c = agg.condition
        for protocol in agg.protocols():
            for group in GROUPS:
                for step in agg.steps:
                    mean, pooled = agg.rate(step, group, protocol)
                    if pooled.n == 0 and mean.n == 0:
                        continue
                    k, n = agg.pooled(step, group, protocol)
                    rows.append({
                        "study": c.study, "cell": c.cell, "arm": c.arm, "protocol": protocol, "group": group,
                        "step": step, "final": step == agg.final_step, "n_seeds": mean.n, "n_runs": agg.n_runs,
                        "mean": mean.estimate, "ci_low": mean.low, "ci_high": mean.high, "count": k,
                        "denominator": n, "pooled": pooled.estimate, "wilson_low": pooled.low,
                        "wilson_high": pooled.high,
                    })
    return rows


def _diff_cell(rows: dict, key: tuple) -> str:
    row = rows.get(key)
    if row is None:
        return "-"
    return fmt_difference(row["estimate"], row["ci_low"], row["ci_high"], row["excludes_zero"])


def markdown(aggregates: Sequence[Aggregate], comparison_rows: list[dict], baselines: dict[str, str],
             missing: list[str], images: Sequence[str] = (),
             cell_tables: Mapping[tuple[str, str], list[str]] | None = None) -> str:
    """report.md without its provenance section; ``cell_tables`` (study, cell) -> lines ending that cell's
    section (:func:`cost_tables`)."""
    by_key = {(r["study"], r["cell"], r["arm"], r["protocol"], r["comparison"], r["group"]): r
              for r in comparison_rows}
    lines = ["# Retention report", ""]
    studies = sorted({a.condition.study for a in aggregates})
    n_runs = sum(a.n_runs for a in aggregates)
    lines.append(f"{n_runs} finished runs from {', '.join(studies)}; {len(aggregates)} conditions.")
    if missing:
        lines.append(f"Left out (not finished): {len(missing)} runs: {', '.join(missing[:10])}"
                     + (" ..." if len(missing) > 10 else ""))
    lines += [
        "",
        "Retention = of the probes passing at t=0, the fraction still passing. Rates: mean over seeds "
        "[95 % t-interval] (pooled kept/passing at t=0); with one seed, the pooled rate [95 % Wilson]. "
        "Differences: paired by seed [95 % paired t-interval], or Newcombe's interval from pooled counts with one "
        "seed; **bold** when the interval excludes zero.",
        "",
        *conclusion(rate_rows(aggregates), comparison_rows),
    ]
    for (study, cell), aggs in _by_cell(aggregates).items():
        step = aggs[0].final_step
        seeds = sorted({s for a in aggs for s in a.seeds})
        lines += ["", f"## {study}: {cell}", "",
                  f"Final retention at step {step}; seeds {seeds}; runs per arm "
                  f"{', '.join(f'{a.condition.arm} {a.n_runs}' for a in aggs)}.", ""]
        base = baselines.get(study)
        if len(aggs) < 2 or all(a.condition.arm != base for a in aggs):
            base = None  # no other arm to compare, or the baseline arm has no finished run in this cell
        header = ["arm", "protocol", GROUP_LABELS["edit"], GROUP_LABELS["control"], "E − I"]
        if base:
            header += [f"E: arm − {base}", f"I: arm − {base}"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for agg in aggs:
            c = agg.condition
            for protocol in agg.protocols():
                cells = [c.arm, protocol, agg.text(agg.final_step, "edit", protocol),
                         agg.text(agg.final_step, "control", protocol),
                         _diff_cell(by_key, (study, cell, c.arm, protocol, "edited - intrinsic", "edit-control"))]
                if base:
                    cells += [_diff_cell(by_key, (study, cell, c.arm, protocol, f"arm - {base}", g))
                              for g in ("edit", "control")]
                lines.append("| " + " | ".join(cells) + " |")
        others = [g for g in ("edit_paraphrase", "control_paraphrase", "edit_neighborhood")
                  if any(agg.pooled(agg.final_step, g, p)[1] for agg in aggs for p in agg.protocols())]
        if others:
            lines += ["", "| arm | protocol | " + " | ".join(GROUP_LABELS[g] for g in others) + " |",
                      "|" + " --- |" * (len(others) + 2)]
            for agg in aggs:
                for protocol in agg.protocols():
                    lines.append(f"| {agg.condition.arm} | {protocol} | "
                                 + " | ".join(agg.text(agg.final_step, g, protocol) for g in others) + " |")
        lines += (cell_tables or {}).get((study, cell), [])
    if images:
        lines += ["", "## Plots", "", "\n\n".join(images)]
    return "\n".join(lines) + "\n"


def _by_cell(aggregates: Sequence[Aggregate]) -> dict[tuple[str, str], list[Aggregate]]:
    out: dict[tuple[str, str], list[Aggregate]] = defaultdict(list)
    for a in aggregates:
        out[(a.condition.study, a.condition.cell)].append(a)
    return dict(out)


def cost_tables(results: Sequence[RunResult], baselines: dict[str, str],
                ) -> tuple[list[dict], list[dict], dict[tuple[str, str], list[str]]]:
    """The rows of costs.csv and accuracy.csv (:mod:`retention.study.costs`), and the tables of every grid cell
    that has its baseline arm and another."""
    cost = cost_rows(results, baselines)
    aggregates = accuracy_aggregates(results)
    accuracy = accuracy_rows(aggregates, condition_ends(results), baselines)
    tables = {}
    for (study, cell), aggs in _by_cell(aggregates).items():
        base = baselines.get(study)
        if len(aggs) >= 2 and any(a.condition.arm == base for a in aggs):
            tables[(study, cell)] = cell_markdown(
                aggs, [r for r in cost if (r["study"], r["cell"]) == (study, cell)],
                [r for r in accuracy if (r["study"], r["cell"]) == (study, cell)], base)
    return cost, accuracy, tables


def write_report(folders: Sequence[str | Path], out: str | Path, plots: bool = True,
                 mixed_provenance: str = "refuse") -> dict[str, Path]:
    """Write the report files of ``folders`` into ``out``; returns their paths by kind."""
    results, baselines, missing = load_results(folders, mixed_provenance)
    aggregates = aggregate(results)
    out = Path(out)
    comparison_rows = comparisons(aggregates, baselines)
    paths: dict[str, Path] = {}
    images: list[str] = []
    if plots:
        cells = _by_cell(aggregates)
        one_study = len({study for study, _ in cells}) == 1
        paths["final"] = plot_final(aggregates, out / "final_retention.png")
        images.append("![final retention per arm](final_retention.png)")
        for (study, cell), aggs in cells.items():
            slug = safe_name(cell if one_study else f"{study}_{cell}")
            path = plot_report_curves(aggs, out / f"curves_{slug}.png", f"{study}: {cell}")
            paths[f"curves {study} {cell}"] = path
            images.append(f"![retention curves, {study}: {cell}]({path.name})")
    cost, accuracy, tables = cost_tables(results, baselines)
    text = markdown(aggregates, comparison_rows, baselines, missing, images, tables) + "\n" + \
        "\n".join(provenance_markdown(results))
    return {
        "markdown": atomic_write_text(out / "report.md", text),
        "csv": atomic_write_text(out / "report.csv", csv_text(rate_rows(aggregates))),
        "comparisons": atomic_write_text(out / "comparisons.csv", csv_text(comparison_rows)),
        "costs": atomic_write_text(out / "costs.csv", csv_text(cost)),
        "accuracy": atomic_write_text(out / "accuracy.csv", csv_text(accuracy)),
        **paths,
    }
