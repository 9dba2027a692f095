"""The finished runs of study or run folders, as the report and the analysis read them: each run's condition
(study, grid cell, arm), seed and summary; a run given twice counted once; runs of different provenance refused
or labelled apart. Their counts per condition and seed (:class:`Aggregate`), and the difference of two
conditions' rates (:func:`difference`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retention.diskcache import digest
from retention.provenance import describe, digest_conflicts, environment_key, pooling_key
from retention.records import GROUPS
from retention.study.runner import DONE
from retention.study.spec import cell_label
from retention.study.stats import Interval, newcombe, paired_interval, t_interval, wilson
from retention.summary import INCOMPLETE

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """A folder that is not a finished study or run."""


@dataclass(frozen=True)
class Condition:
    """What a run measures: its study, grid cell (``all`` outside a grid) and arm."""

    study: str
    cell: str
    arm: str


@dataclass
class RunResult:
    """A finished run: its condition, seed, fact (the ``single`` protocol) and summary.json."""

    condition: Condition
    seed: int
    fact: int | None
    summary: dict
    folder: Path
    seconds: float | None = None
    """The run's wall time as the study measured it (``study_run.json``); None outside a study."""


Counts = dict[int, dict[str, dict[str, tuple[int, int]]]]
"""step -> group -> protocol -> (count, denominator)."""


def run_counts(summary: dict) -> Counts:
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
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{folder}: no summary.json (not a finished run)") from None
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8, or a too-long integer
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    try:
        if not isinstance(summary.get("run"), dict) or not isinstance(summary.get("provenance", {}), dict):
            raise TypeError("'run' and 'provenance' must be mappings")
        run_counts(summary)
        int(summary["run"].get("seed", 0))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ReportError(f"{path}: not a summary.json of retention fit ({type(err).__name__}: {err})") from None
    return summary


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


def _read_study_state(path: Path) -> tuple[str, str, list[dict]]:
    """A study.json's name, baseline arm and runs (each with its name, state, cell, arm, seed and fact)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        runs = state["runs"]
        for run in runs:
            if not isinstance(run["cell"], dict) or not isinstance(run["name"], str):
                raise TypeError("a run's 'cell' must be a mapping and its 'name' a string")
            run["state"], run["arm"], run["seed"], run["fact"]  # noqa: B018 -- each run has every field
        return str(state["spec"]["name"]), str(state["spec"]["baseline"]), runs
    except (ValueError, RecursionError) as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise ReportError(f"{path}: not a study.json of retention study ({type(err).__name__}: {err})") from None


def _run_seconds(path: Path) -> float | None:
    """The seconds a study's ``study_run.json`` records for its run (None where it has none)."""
    try:
        seconds = json.loads(path.read_text(encoding="utf-8")).get("seconds")
    except (ValueError, RecursionError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) else None


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
            name, baselines_of, runs = _read_study_state(folder / "study.json")
            baselines[name] = baselines_of
            for run in runs:
                run_dir = folder / "runs" / run["name"]
                if run["state"] != "done" or not (run_dir / DONE).is_file():
                    missing.append(f"{name}/{run['name']} ({run['state']})")
                    continue
                add(RunResult(Condition(name, cell_label(list(run["cell"].items())), run["arm"]), run["seed"],
                              run["fact"], _read_summary(run_dir), run_dir, _run_seconds(run_dir / DONE)))
        elif (folder / "summary.json").is_file() or (folder / INCOMPLETE).is_file():
            summary = _read_summary(folder)
            add(RunResult(Condition(folder.resolve().name, "all", folder.resolve().name),
                          int(summary["run"].get("seed", 0)), None, summary, folder))
        else:
            raise ReportError(f"{folder}: neither a study folder (study.json) nor a run folder (summary.json)")
    if not results:
        raise ReportError(f"no finished runs in {', '.join(map(str, folders))}")
    return _check_provenance(results, baselines, mixed_provenance), baselines, missing


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
        """The steps every seed measured."""
        common = set.intersection(*(set(c) for c in self.counts.values()))
        return sorted(common)

    @property
    def final_step(self) -> int:
        """The last step every seed measured."""
        return self.steps[-1]

    def per_seed(self, step: int, group: str, protocol: str) -> list[float]:
        """Each seed's rate (NaN where nothing passed at t=0)."""
        out = []
        for seed in self.seeds:
            k, n = self.counts[seed].get(step, {}).get(group, {}).get(protocol, (0, 0))
            out.append(k / n if n else math.nan)
        return out

    def pooled(self, step: int, group: str, protocol: str) -> tuple[int, int]:
        """(kept, passing at t=0), the seeds' counts summed."""
        pairs = [self.counts[s].get(step, {}).get(group, {}).get(protocol, (0, 0)) for s in self.seeds]
        return sum(k for k, _ in pairs), sum(n for _, n in pairs)

    def rate(self, step: int, group: str, protocol: str) -> tuple[Interval, Interval]:
        """(mean over seeds with t-interval, pooled with Wilson interval)."""
        return (t_interval(self.per_seed(step, group, protocol), bounds=(0.0, 1.0)),
                wilson(*self.pooled(step, group, protocol)))

    def band(self, step: int, group: str, protocol: str) -> Interval:
        """The rate the plots draw: the mean over seeds with its t-interval, or with one seed the pooled rate
        with its Wilson interval."""
        mean, pooled = self.rate(step, group, protocol)
        return mean if len(self.seeds) >= 2 else pooled

    def text(self, step: int, group: str, protocol: str) -> str:
        """The report's cell: the mean over seeds [t-interval] (one seed: pooled [Wilson]) and the pooled
        count / denominator; ``-`` without probes."""
        mean, pooled = self.rate(step, group, protocol)
        if pooled.n == 0:
            return "-"
        k, n = self.pooled(step, group, protocol)
        return f"{(mean if len(self.seeds) >= 2 else pooled).fmt()} ({k}/{n})"

    def protocols(self) -> list[str]:
        """The protocols recorded, in first-seen order."""
        seen: dict[str, None] = {}
        for by_step in self.counts.values():
            for by_group in by_step.values():
                for by_p in by_group.values():
                    seen.update(dict.fromkeys(by_p))
        return list(seen)


def by_condition_and_seed(results: Sequence[RunResult]) -> dict[Condition, dict[int, list[RunResult]]]:
    """Condition (in the order results first show it) -> seed (ascending) -> its runs (the ``single`` protocol
    makes several per seed)."""
    grouped: dict[Condition, dict[int, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        grouped[r.condition][r.seed].append(r)
    return {c: dict(sorted(by_seed.items())) for c, by_seed in grouped.items()}


def aggregates(results: Sequence[RunResult], seed_counts: Callable[[list[RunResult]], Counts]) -> list[Aggregate]:
    """One :class:`Aggregate` per condition, each seed's counts made from its runs by ``seed_counts``."""
    return [Aggregate(c, list(by_seed), sum(map(len, by_seed.values())),
                      {seed: seed_counts(runs) for seed, runs in by_seed.items()})
            for c, by_seed in by_condition_and_seed(results).items()]


def _pooled_at_common_steps(runs: list[RunResult]) -> Counts:
    pooled: Counts = {}
    per_run = [run_counts(r.summary) for r in runs]
    for step in set.intersection(*(set(c) for c in per_run)):
        for c in per_run:
            for g, by_p in c[step].items():
                for p, (k, n) in by_p.items():
                    k0, n0 = pooled.setdefault(step, {}).setdefault(g, {}).get(p, (0, 0))
                    pooled[step][g][p] = (k0 + k, n0 + n)
    return pooled


def aggregate(results: Sequence[RunResult]) -> list[Aggregate]:
    """One :class:`Aggregate` per condition: each seed's runs pooled at the steps they all measured."""
    return aggregates(results, _pooled_at_common_steps)


def difference(a: Aggregate, b: Aggregate, step_a: int, step_b: int, group_a: str, group_b: str,
                protocol: str) -> tuple[Interval, str]:
    """``a - b`` of a group's rate: paired over common seeds when there are two or more, else Newcombe on pooled counts."""
    common = [s for s in a.seeds if s in b.seeds]
    if len(common) >= 2:
        xa = [a.per_seed(step_a, group_a, protocol)[a.seeds.index(s)] for s in common]
        xb = [b.per_seed(step_b, group_b, protocol)[b.seeds.index(s)] for s in common]
        return paired_interval(xa, xb), "paired t over seeds"
    return newcombe(*a.pooled(step_a, group_a, protocol), *b.pooled(step_b, group_b, protocol)), "Newcombe (pooled)"
