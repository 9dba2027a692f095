"""``retention report``: retention over seeds with intervals, edited vs intrinsic and every arm vs the baseline,
from study folders or single run folders.

Per condition (study, grid cell, arm), protocol, probe group and measured step: the rate of each seed (the
counts of a seed's runs pooled: under the ``single`` protocol a seed has one run per fact), their mean with a
t-interval over seeds, and the pooled count / denominator with Wilson's interval. At the final step: edited
minus intrinsic per arm and each arm minus the baseline arm, paired by seed (paired t-interval) when there are
two seeds or more, else from the pooled counts (Newcombe's interval). See :mod:`retention.study.stats`.

Outputs (atomically): ``report.md``, ``report.csv`` (one row per condition x protocol x group x step),
``comparisons.csv``, ``curves_<cell>.png`` (retention against steps, edited and intrinsic side by side, with
interval bands) and ``final_retention.png`` (final retention per arm with intervals).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retention.diskcache import digest
from retention.io import atomic_write_text
from retention.provenance import describe, digest_conflicts, environment_key, pooling_key
from retention.records import GROUP_LABELS, GROUPS
from retention.reporting import INCOMPLETE, save_figure
from retention.study.runner import DONE
from retention.study.spec import cell_label
from retention.study.stats import Interval, newcombe, paired_interval, t_interval, wilson
from retention.study.tables import csv_text

log = logging.getLogger(__name__)

Counts = dict[int, dict[str, dict[str, tuple[int, int]]]]
"""step -> group -> protocol -> (count, denominator)."""
COMPARED_GROUPS = ("edit", "control", "edit_paraphrase")


class ReportError(ValueError):
    """A folder that is not a finished study or run."""


@dataclass(frozen=True)
class Condition:
    study: str
    cell: str
    arm: str


@dataclass
class RunResult:
    condition: Condition
    seed: int
    fact: int | None
    summary: dict
    folder: Path


def _counts(summary: dict) -> Counts:
    """Per-step counts of a run's summary (older summaries without ``measurements`` give the final step only)."""
    out: Counts = {}
    measurements = summary.get("measurements") or [
        {"step": summary["final_step"],
         "retention": {g: {p: summary["retention"][p][g] for p in summary["retention"] if g in summary["retention"][p]}
                       for g in GROUPS}}
    ]
    for m in measurements:
        out[int(m["step"])] = {g: {p: (int(r["count"]), int(r["denominator"])) for p, r in by_p.items()}
                               for g, by_p in m["retention"].items() if by_p}
    return out


def _read_summary(folder: Path) -> dict:
    path = folder / "summary.json"
    if (folder / INCOMPLETE).exists():
        raise ReportError(f"{folder}: the run has not finished ({INCOMPLETE} is there); resume it with "
                          "`retention fit --config <its config> --ckpt_path last` or run it again")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{folder}: no summary.json (not a finished run)") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None


MIXED_PROVENANCE = ("refuse", "label")


def provenance_groups(results: Sequence[RunResult]) -> dict[tuple, list[RunResult]]:
    """Runs grouped by what produced them (:func:`retention.provenance.pooling_key`), in first-seen order."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault(pooling_key(r.summary.get("provenance")), []).append(r)
    return groups


def _check_provenance(results: list[RunResult], baselines: dict[str, str], mixed: str) -> list[RunResult]:
    """The runs as they may be pooled: one environment (:func:`retention.provenance.environment_key`) and no
    corpus or model name read as different bytes; else a ReportError (``refuse``) or, with ``label``, each
    provenance group's studies renamed ``<study> [p<i>]`` so they are never pooled."""
    if mixed not in MIXED_PROVENANCE:
        raise ReportError(f"--mixed_provenance {mixed!r}: choose from {', '.join(MIXED_PROVENANCE)}")
    blocks = [r.summary.get("provenance") for r in results]
    conflicts = digest_conflicts(blocks)
    if len({environment_key(b) for b in blocks}) == 1 and not conflicts:
        return results
    groups = provenance_groups(results)
    lines = [f"  p{i}: {len(runs)} run(s), e.g. {runs[0].folder}: {describe(runs[0].summary.get('provenance'))}"
             for i, runs in enumerate(groups.values(), 1)] + [f"  {c}" for c in conflicts]
    if mixed == "refuse":
        raise ReportError("the runs were produced by different code or environment, or read different bytes under "
                          "one corpus or model name, and are not pooled:\n" + "\n".join(lines)
                          + "\nreport them separately, or pass --mixed_provenance label to keep each group apart in "
                          "one report")
    log.warning("runs of %d provenances, kept apart:\n%s", len(groups), "\n".join(lines))
    labelled = []
    for i, runs in enumerate(groups.values(), 1):
        for r in runs:
            study = f"{r.condition.study} [p{i}]"
            if r.condition.study in baselines:
                baselines[study] = baselines[r.condition.study]
            labelled.append(dataclasses.replace(r, condition=dataclasses.replace(r.condition, study=study)))
    return labelled


def load_results(folders: Sequence[str | Path], mixed_provenance: str = "refuse",
                 ) -> tuple[list[RunResult], dict[str, str], list[str]]:
    """Finished runs of the given study or run folders; the baseline arm of each study; what was left out.
    Runs of different provenance are refused or labelled apart (``mixed_provenance``, :func:`_check_provenance`)."""
    results, baselines, missing = [], {}, []
    seen: dict[Any, Path] = {}
    """Resolved run folder, and digest of its summary, -> the folder first given: a run given twice (two
    spellings of one path, a study and one of its runs, or a copy of a run folder) counts once."""

    def add(result: RunResult) -> None:
        for key in (result.folder.resolve(), digest(result.summary)):
            if key in seen:
                log.warning("%s is the run %s, given already: counted once", result.folder, seen[key])
                return
        seen[result.folder.resolve()] = seen[digest(result.summary)] = result.folder
        results.append(result)

    for folder in map(Path, folders):
        if (folder / "study.json").is_file():
            state = json.loads((folder / "study.json").read_text(encoding="utf-8"))
            name = state["spec"]["name"]
            baselines[name] = state["spec"]["baseline"]
            for run in state["runs"]:
                run_dir = folder / "runs" / run["name"]
                if run["state"] != "done" or not (run_dir / DONE).is_file():
                    missing.append(f"{name}/{run['name']} ({run['state']})")
                    continue
                add(RunResult(Condition(name, cell_label(list(run["cell"].items())), run["arm"]), run["seed"],
                              run["fact"], _read_summary(run_dir), run_dir))
        elif (folder / "summary.json").is_file() or (folder / INCOMPLETE).is_file():
            summary = _read_summary(folder)
            add(RunResult(Condition(folder.resolve().name, "all", folder.resolve().name),
                          int(summary["run"].get("seed", 0)), None, summary, folder))
        else:
            raise ReportError(f"{folder}: neither a study folder (study.json) nor a run folder (summary.json)")
    if not results:
        raise ReportError(f"no finished runs in {', '.join(map(str, folders))}")
    return _check_provenance(results, baselines, mixed_provenance), baselines, missing


def provenance_markdown(results: Sequence[RunResult]) -> list[str]:
    """The report's provenance section: each group of runs and what produced it."""
    lines = ["## Provenance", ""]
    for runs in provenance_groups(results).values():
        studies = sorted({r.condition.study for r in runs})
        lines.append(f"- {len(runs)} run(s) of {', '.join(studies)}: {describe(runs[0].summary.get('provenance'))}")
    return lines + [""]


@dataclass
class Aggregate:
    """One condition's per-seed counts (facts pooled) at every step all its seeds measured."""

    condition: Condition
    seeds: list[int]
    n_runs: int
    counts: dict[int, Counts]
    """seed -> per-step counts."""

    @property
    def steps(self) -> list[int]:
        common = set.intersection(*(set(c) for c in self.counts.values()))
        return sorted(common)

    @property
    def final_step(self) -> int:
        return self.steps[-1]

    def per_seed(self, step: int, group: str, protocol: str) -> list[float]:
        out = []
        for seed in self.seeds:
            k, n = self.counts[seed].get(step, {}).get(group, {}).get(protocol, (0, 0))
            out.append(k / n if n else math.nan)
        return out

    def pooled(self, step: int, group: str, protocol: str) -> tuple[int, int]:
        pairs = [self.counts[s].get(step, {}).get(group, {}).get(protocol, (0, 0)) for s in self.seeds]
        return sum(k for k, _ in pairs), sum(n for _, n in pairs)

    def rate(self, step: int, group: str, protocol: str) -> tuple[Interval, Interval]:
        """(mean over seeds with t-interval, pooled with Wilson interval)."""
        return (t_interval(self.per_seed(step, group, protocol), bounds=(0.0, 1.0)),
                wilson(*self.pooled(step, group, protocol)))

    def protocols(self) -> list[str]:
        seen: dict[str, None] = {}
        for by_step in self.counts.values():
            for by_group in by_step.values():
                for by_p in by_group.values():
                    seen.update(dict.fromkeys(by_p))
        return list(seen)


def aggregate(results: Sequence[RunResult]) -> list[Aggregate]:
    by_condition: dict[Condition, dict[int, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_condition[r.condition][r.seed].append(r)
    out = []
    for condition, by_seed in by_condition.items():
        counts: dict[int, Counts] = {}
        for seed, runs in sorted(by_seed.items()):
            pooled: Counts = {}
            per_run = [_counts(r.summary) for r in runs]
            for step in set.intersection(*(set(c) for c in per_run)):
                for c in per_run:
                    for g, by_p in c[step].items():
                        for p, (k, n) in by_p.items():
                            k0, n0 = pooled.setdefault(step, {}).setdefault(g, {}).get(p, (0, 0))
                            pooled[step][g][p] = (k0 + k, n0 + n)
            counts[seed] = pooled
        out.append(Aggregate(condition, sorted(by_seed), sum(len(v) for v in by_seed.values()), counts))
    return out


def _difference(a: Aggregate, b: Aggregate, step_a: int, step_b: int, group_a: str, group_b: str,
                protocol: str) -> tuple[Interval, str]:
    """``a - b``: paired over common seeds when there are two or more, else Newcombe on pooled counts."""
    common = [s for s in a.seeds if s in b.seeds]
    if len(common) >= 2:
        xa = [a.per_seed(step_a, group_a, protocol)[a.seeds.index(s)] for s in common]
        xb = [b.per_seed(step_b, group_b, protocol)[b.seeds.index(s)] for s in common]
        return paired_interval(xa, xb), "paired t over seeds"
    return newcombe(*a.pooled(step_a, group_a, protocol), *b.pooled(step_b, group_b, protocol)), "Newcombe (pooled)"


def comparisons(aggregates: Sequence[Aggregate], baselines: dict[str, str]) -> list[dict]:
    """Edited minus intrinsic per condition, and each arm minus its cell's baseline arm, at the final step."""
    rows = []
    index = {(a.condition.study, a.condition.cell, a.condition.arm): a for a in aggregates}
    for agg in aggregates:
        c, step = agg.condition, agg.final_step
        for protocol in agg.protocols():
            diff, method = _difference(agg, agg, step, step, "edit", "control", protocol)
            rows.append(_comparison_row(c, protocol, "edited - intrinsic", "edit-control", step, diff, method))
            base = index.get((c.study, c.cell, baselines.get(c.study, "")))
            if base is None or base is agg:
                continue
            for group in COMPARED_GROUPS:
                diff, method = _difference(agg, base, step, base.final_step, group, group, protocol)
                rows.append(_comparison_row(c, protocol, f"arm - {base.condition.arm}", group, step, diff, method))
    return rows


def _comparison_row(c: Condition, protocol: str, comparison: str, group: str, step: int, d: Interval,
                    method: str) -> dict:
    return {"study": c.study, "cell": c.cell, "arm": c.arm, "protocol": protocol, "comparison": comparison,
            "group": group, "step": step, "n": d.n, "estimate": d.estimate, "ci_low": d.low, "ci_high": d.high,
            "excludes_zero": d.excludes_zero, "method": method}


def rate_rows(aggregates: Sequence[Aggregate]) -> list[dict]:
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


def _cell(agg: Aggregate, step: int, group: str, protocol: str) -> str:
    mean, pooled = agg.rate(step, group, protocol)
    if pooled.n == 0:
        return "-"
    k, n = agg.pooled(step, group, protocol)
    main = mean.fmt() if len(agg.seeds) >= 2 else pooled.fmt()
    return f"{main} ({k}/{n})"


def _diff_cell(rows: dict, key: tuple) -> str:
    row = rows.get(key)
    if row is None:
        return "-"
    d = Interval(row["estimate"], row["ci_low"], row["ci_high"], row["n"])
    text = f"{d.estimate:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" if not math.isnan(d.low) else d.fmt()
    return f"**{text}**" if d.excludes_zero else text


def markdown(aggregates: Sequence[Aggregate], comparison_rows: list[dict], baselines: dict[str, str],
             missing: list[str], images: Sequence[str] = ()) -> str:
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
                cells = [c.arm, protocol, _cell(agg, agg.final_step, "edit", protocol),
                         _cell(agg, agg.final_step, "control", protocol),
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
                                 + " | ".join(_cell(agg, agg.final_step, g, protocol) for g in others) + " |")
    if images:
        lines += ["", "## Plots", "", "\n\n".join(images)]
    return "\n".join(lines) + "\n"


def _by_cell(aggregates: Sequence[Aggregate]) -> dict[tuple[str, str], list[Aggregate]]:
    out: dict[tuple[str, str], list[Aggregate]] = defaultdict(list)
    for a in aggregates:
        out[(a.condition.study, a.condition.cell)].append(a)
    return dict(out)


def _band(agg: Aggregate, step: int, group: str, protocol: str) -> Interval:
    mean, pooled = agg.rate(step, group, protocol)
    return mean if len(agg.seeds) >= 2 else pooled


def plot_curves(aggs: Sequence[Aggregate], path: Path, title: str) -> Path:
    """Rows: arms; columns: protocols; edited (red) and intrinsic (blue) retention with interval bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = aggs[0].protocols()
    fig, axes = plt.subplots(len(aggs), len(protocols), figsize=(3.6 * len(protocols), 2.6 * len(aggs)),
                             squeeze=False, sharex=True, sharey=True)
    for row, agg in zip(axes, aggs):
        for ax, protocol in zip(row, protocols):
            for group, color in (("edit", "C3"), ("control", "C0")):
                points = [(s, _band(agg, s, group, protocol)) for s in agg.steps]
                points = [(s, i) for s, i in points if not math.isnan(i.estimate)]
                if not points:
                    continue
                xs = [s for s, _ in points]
                ax.plot(xs, [i.estimate for _, i in points], color=color, marker="o", markersize=3,
                        label=GROUP_LABELS[group])
                lows = [i.low if not math.isnan(i.low) else i.estimate for _, i in points]
                highs = [i.high if not math.isnan(i.high) else i.estimate for _, i in points]
                ax.fill_between(xs, lows, highs, color=color, alpha=0.18, linewidth=0)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.set_title(f"{agg.condition.arm} · {protocol}", fontsize=9)
        row[0].set_ylabel("retention")
    for ax in axes[-1]:
        ax.set_xlabel("fine-tuning step")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_final(aggregates: Sequence[Aggregate], path: Path) -> Path:
    """Final retention per condition, edited and intrinsic side by side, one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(p for a in aggregates for p in a.protocols()))
    # "editor=rome-sequential, lr=0.001" -> "rome-sequential, 0.001": the axis names are in the report's tables.
    labels = [a.condition.arm if a.condition.cell == "all" else
              f"{a.condition.arm}\n{', '.join(part.split('=', 1)[-1] for part in a.condition.cell.split(', '))}"
              for a in aggregates]
    fig, axes = plt.subplots(len(protocols), 1, figsize=(max(6.0, 0.9 * len(aggregates) + 2), 2.8 * len(protocols)),
                             squeeze=False)
    for ax, protocol in zip(axes[:, 0], protocols):
        for offset, (group, color) in zip((-0.2, 0.2), (("edit", "C3"), ("control", "C0"))):
            bands = [_band(a, a.final_step, group, protocol) for a in aggregates]
            xs = [i + offset for i in range(len(aggregates))]
            ys = [b.estimate for b in bands]
            err = [[max(0.0, b.estimate - b.low) if not math.isnan(b.low) else 0 for b in bands],
                   [max(0.0, b.high - b.estimate) if not math.isnan(b.high) else 0 for b in bands]]
            ax.bar(xs, ys, width=0.4, color=color, alpha=0.8, yerr=err, capsize=3, label=GROUP_LABELS[group])
        ax.set_xticks(range(len(aggregates)))
        ax.set_xticklabels(labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"retention ({protocol})")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


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
            slug = re.sub(r"[^\w.=-]+", "_", cell if one_study else f"{study}_{cell}")
            path = plot_curves(aggs, out / f"curves_{slug}.png", f"{study}: {cell}")
            paths[f"curves {study} {cell}"] = path
            images.append(f"![retention curves, {study}: {cell}]({path.name})")
    text = markdown(aggregates, comparison_rows, baselines, missing, images) + "\n" + \
        "\n".join(provenance_markdown(results))
    return {
        "markdown": atomic_write_text(out / "report.md", text),
        "csv": atomic_write_text(out / "report.csv", csv_text(rate_rows(aggregates))),
        "comparisons": atomic_write_text(out / "comparisons.csv", csv_text(comparison_rows)),
        **paths,
    }
