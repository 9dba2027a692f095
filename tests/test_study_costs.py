"""The report's cost, damage and end-accuracy tables (``costs.csv``, ``accuracy.csv``), from synthetic study folders
(no model): seconds charged for reused edits, arm − baseline paired by seed, the end of an arm that edits after
fine-tuning read from ``after_finetune``, and report.csv's columns unchanged."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from retention.study.costs import QUANTITIES, accuracy_aggregates, accuracy_rows, condition_ends, cost_rows
from retention.study.report import load_results, write_report
from retention.study.runner import DONE
from retention.study.stats import t_interval, wilson

PROTOCOLS = ("top1", "prob")
EDIT_RUN = {"editor": "alphaedit", "hparams": {"layers": [4]}, "mode": "batch", "augmented_phrasings": 0,
            "base_fingerprint": "0123456789abcdef"}
FINE_TUNE_S = {"baseline": [50.0, 50.0, 50.0], "anchor": [60.0, 70.0, 80.0], "reedit": [50.0, 50.0, 50.0]}
END_EDIT = {"baseline": [4, 5, 6], "anchor": [6, 6, 7], "reedit": [10, 9, 10]}
"""Edited facts passing (of 10) at the end: the last measurement, or after the re-edit."""


def _rate(count: int, denominator: int = 10) -> dict:
    return {"value": count / denominator, "count": count, "denominator": denominator}


def _accuracy(edit: int, neighborhood: int, control: int) -> dict:
    return {g: {p: _rate(k) for p in PROTOCOLS}
            for g, k in (("edit", edit), ("edit_neighborhood", neighborhood), ("control", control))}


def _summary(arm: str, seed: int) -> dict:
    reused = arm == "anchor"  # the anchor arm reuses the baseline's edit from the cache
    t0 = _accuracy(10, 9 - (arm == "reedit"), 8)
    last = _accuracy(END_EDIT["baseline" if arm == "reedit" else arm][seed], 7, 6 + seed)
    summary = {
        "run": {"seed": seed, **EDIT_RUN, "edit_case_ids": [f"s{seed}:{i}" for i in range(10)],
                "reused": {"selection": True, "edit": reused}},
        "protocols": list(PROTOCOLS), "final_step": 100,
        "measurements": [{"step": 0, "accuracy": t0, "retention": t0}, {"step": 100, "accuracy": last,
                                                                         "retention": last}],
        "timings": {"select_s": 3.0, "edit_s": 1.0 if reused else 100.0 + seed, "measure_s": 20.0,
                    "fine_tune_s": FINE_TUNE_S[arm][seed], "total_s": 200.0},
        "downstream": {"first": {"step": 0, "val/loss": 3.0}, "last": {"step": 100, "val/loss": 3.5 + 0.1 * seed
                                                                        + (arm == "anchor") * 0.2}},
        "provenance": {"code": {"retention": "0.1.0", "commit": "c0ffee" * 6, "dirty": False}},
    }
    if arm == "reedit":
        summary["after_finetune"] = {"mode": "reedit", "step": 100, "edit_seconds": 40.0, "measure_seconds": 5.0,
                                     "accuracy": _accuracy(END_EDIT["reedit"][seed], 6, 6 + seed),
                                     "retention": _accuracy(END_EDIT["reedit"][seed], 6, 6 + seed)}
    return summary


def make_study(folder: Path, arms=("baseline", "anchor", "reedit"), seeds=(0, 1, 2)) -> Path:
    runs = []
    for arm in arms:
        for seed in seeds:
            name = f"{arm}__seed{seed}"
            (folder / "runs" / name).mkdir(parents=True)
            (folder / "runs" / name / "summary.json").write_text(json.dumps(_summary(arm, seed)))
            (folder / "runs" / name / DONE).write_text(json.dumps({"seconds": 300.0 + 10 * seed}))
            runs.append({"name": name, "cell": {}, "arm": arm, "seed": seed, "fact": None, "state": "done"})
    (folder / "study.json").write_text(json.dumps({"spec": {"name": "rem", "baseline": "baseline"}, "runs": runs}))
    return folder


def _by(rows: list[dict], *keys: str) -> dict:
    return {tuple(r[k] for k in keys): r for r in rows}


def test_costs_charge_a_reused_edit_and_pair_arms_by_seed(tmp_path):
    results, baselines, _ = load_results([make_study(tmp_path / "rem")])
    rows = _by(cost_rows(results, baselines), "arm", "quantity")
    # The anchor arm's edit came from the cache (1 s); it is charged what the baseline's run computing it took.
    assert [rows["anchor", "edit_s"]["mean"], rows["baseline", "edit_s"]["mean"]] == [101.0, 101.0]
    # work = edit + fine-tune + after-fine-tune edit; anchor − baseline = +10, +20, +30 s by seed.
    anchor = rows["anchor", "work_s"]
    expected = t_interval([10.0, 20.0, 30.0])
    assert (anchor["diff"], anchor["diff_low"], anchor["diff_high"], anchor["diff_n"]) == \
        (expected.estimate, expected.low, expected.high, 3)
    assert anchor["method"] == "paired t over seeds" and not anchor["excludes_zero"]
    # The re-edit costs its 40 s edit after fine-tuning in every seed; its measurement counts under measure_s.
    reedit = rows["reedit", "work_s"]
    assert reedit["diff"] == pytest.approx(40.0) and reedit["excludes_zero"]
    assert rows["reedit", "after_edit_s"]["mean"] == 40.0 and rows["reedit", "measure_s"]["mean"] == 25.0
    # Wall seconds are study_run.json's; validation loss after fine-tuning is paired like the rest.
    assert rows["baseline", "wall_s"]["mean"] == pytest.approx(310.0)
    assert rows["anchor", "val_loss_last"]["diff"] == pytest.approx(0.2)
    assert "diff" not in rows["baseline", "work_s"]  # the baseline is not compared with itself
    assert {q for _, q in rows} == set(QUANTITIES)


def test_an_edit_reused_from_an_earlier_study_keeps_its_own_seconds(tmp_path):
    results, baselines, _ = load_results([make_study(tmp_path / "rem", arms=("anchor",))])
    rows = _by(cost_rows(results, {}), "arm", "quantity")
    assert rows["anchor", "edit_s"]["mean"] == 1.0 and "diff" not in rows["anchor", "edit_s"]


def test_the_end_of_an_arm_that_edits_after_fine_tuning_is_after_its_edit(tmp_path):
    results, baselines, _ = load_results([make_study(tmp_path / "rem")])
    aggregates = accuracy_aggregates(results)
    ends = condition_ends(results)
    rows = _by(accuracy_rows(aggregates, ends, baselines), "arm", "stage", "protocol", "group")
    end = rows["reedit", "end", "top1", "edit"]
    assert end["end"] == "after reedit" and rows["baseline", "end", "top1", "edit"]["end"] == "fine-tuned"
    pooled = wilson(29, 30)  # 10 + 9 + 10 after the re-edit
    assert (end["count"], end["denominator"], end["wilson_low"], end["wilson_high"]) == (29, 30, pooled.low,
                                                                                        pooled.high)
    # against the baseline's end (4, 5, 6 of 10), seed by seed: +0.6, +0.4, +0.4
    assert end["diff"] == pytest.approx(7 / 15) and end["excludes_zero"] and end["method"] == "paired t over seeds"
    # Damage at t=0: the re-edit arm's neighbourhood prompts 8/10 against 9/10 in every seed.
    damage = rows["reedit", "t0", "prob", "edit_neighborhood"]
    assert damage["diff"] == pytest.approx(-0.1) and damage["diff_low"] == pytest.approx(-0.1)
    assert rows["baseline", "t0", "top1", "control"]["mean"] == pytest.approx(0.8)


def test_one_seed_gets_newcombe_and_no_seconds_interval(tmp_path):
    results, baselines, _ = load_results([make_study(tmp_path / "rem", seeds=(1,))])
    acc = _by(accuracy_rows(accuracy_aggregates(results), condition_ends(results), baselines),
              "arm", "stage", "protocol", "group")
    assert acc["reedit", "end", "top1", "edit"]["method"] == "Newcombe (pooled)"
    cost = _by(cost_rows(results, baselines), "arm", "quantity")["anchor", "work_s"]
    assert cost["diff"] == 20.0 and math.isnan(cost["diff_low"]) and cost["method"] == "one seed, no interval"


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f))


def test_the_report_writes_the_tables_and_keeps_report_csv_as_it_was(tmp_path):
    paths = write_report([make_study(tmp_path / "rem")], tmp_path / "out", plots=False)
    assert _header(paths["csv"]) == ["study", "cell", "arm", "protocol", "group", "step", "final", "n_seeds",
                                     "n_runs", "mean", "ci_low", "ci_high", "count", "denominator", "pooled",
                                     "wilson_low", "wilson_high"]
    assert _header(paths["costs"])[:8] == ["study", "cell", "arm", "quantity", "n_seeds", "mean", "ci_low", "ci_high"]
    assert "stage" in _header(paths["accuracy"]) and "end" in _header(paths["accuracy"])
    text = paths["markdown"].read_text()
    assert "**Cost against baseline.**" in text and "**Damage at t=0 against baseline**" in text
    assert "| reedit | after reedit | top1 | 0.97 [0.82, 1.00] (29/30) | **+0.47 [+0.18, +0.75]** |" in text
    assert "| anchor | 310 [285, 335] | 171 [144, 198] | +20 [-5, +45] | 3.000 → 3.800 [3.552, 4.048] | " \
        "**+0.200 [+0.200, +0.200]** |" in text


def test_a_null_validation_loss_or_missing_timings_are_nan(tmp_path):
    from retention.study.costs import run_quantities
    from retention.study.results import Condition, RunResult

    summary = _summary("baseline", 0) | {"downstream": {"last": {"step": 100, "val/loss": None}}, "timings": {}}
    q = run_quantities(RunResult(Condition("s", "all", "a"), 0, None, summary, tmp_path), {})
    assert all(math.isnan(q[k]) for k in QUANTITIES)  # no study_run.json seconds, no timings, no losses
