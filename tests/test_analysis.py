"""The analysis of why edits survive (retention.study.analysis): Kaplan–Meier and log-rank against hand-worked
examples, the logistic regression against closed forms, the probe records' target rank, feature extraction on a
tiny study, `retention report --analysis` in process, and the dose-response study files."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_runs import fit_config, prepare

from retention.cli import main as cli_main
from retention.study import StudySpec
from retention.study.analysis import write_analysis
from retention.study.analysis.decomposition import token_category
from retention.study.analysis.facts import first_loss, read_probes
from retention.study.analysis.features import count_terms
from retention.study.analysis.matched import quantile_edges
from retention.study.analysis.regression import logistic_regression
from retention.study.analysis.survival import kaplan_meier, logrank

DOSE_STUDIES = sorted((Path(__file__).resolve().parents[1] / "configs" / "studies").glob("dose_*.yaml"))


# -- survival ---------------------------------------------------------------------------------------------------


def test_first_loss_is_the_first_failing_step_after_t0():
    steps = (0, 10, 20, 30)
    assert first_loss(steps, (True, True, False, True)) == (20, True)  # lost at 20; passing again later: still lost
    assert first_loss(steps, (True, True, True, True)) == (30, False)  # censored at the last step
    assert first_loss(steps, (False, True, True, True)) is None  # not passing at t=0: not at risk
    assert first_loss(steps, (True, None, True, False)) == (30, True)  # unmeasured steps are skipped


def test_kaplan_meier_by_hand():
    # Six facts: lost at 10, lost at 10, censored at 20, lost at 30, censored at 30 (twice).
    # t=10: 6 at risk, 2 lost: S = 4/6 = 0.666667; Greenwood sum 2/(6*4) = 0.083333;
    #       se = S*sqrt(0.083333) = 0.192450; log-log se = sqrt(0.083333)/|ln S| = 0.288675/0.405465 = 0.711960;
    #       interval S^exp(+-1.959964*0.711960) = (2/3)^4.0367, (2/3)^0.24773 = [0.194617, 0.904434].
    # t=20: 4 at risk, one censored, none lost: S stays 0.666667.
    # t=30: 3 at risk (events before censorings), 1 lost: S = 0.666667*2/3 = 0.444444;
    #       sum 0.083333 + 1/(3*2) = 0.25; se = 0.444444*0.5 = 0.222222;
    #       log-log se = 0.5/|ln 0.444444| = 0.5/0.810930 = 0.616576; interval [0.066187, 0.784908].
    km = kaplan_meier([10, 10, 20, 30, 30, 30], [True, True, False, True, False, False])
    assert [(k.step, k.at_risk, k.events, k.censored) for k in km] == [
        (0, 6, 0, 0), (10, 6, 2, 0), (20, 4, 0, 1), (30, 3, 1, 2)]
    got = [(k.survival, k.se, k.low, k.high) for k in km]
    assert got[0] == (1.0, 0.0, 1.0, 1.0)
    assert got[1] == pytest.approx((0.666667, 0.192450, 0.194617, 0.904434), abs=1e-6)
    assert got[2] == pytest.approx(got[1])
    assert got[3] == pytest.approx((0.444444, 0.222222, 0.066187, 0.784908), abs=1e-6)
    # Everyone lost at one step: S = 0, the interval collapses onto it.
    last = kaplan_meier([5, 5], [True, True])[-1]
    assert (last.survival, last.low, last.high) == (0.0, 0.0, 0.0)


def test_logrank_by_hand():
    # A: lost 10, 10, 30; censored 20, 30, 30.   B: lost 20; censored 30 (three times).
    # t=10: n1=6, n2=4, d=2, d1=2: O-E = 2 - 2*6/10 = 0.8;  V = 6*4*2*8/(10^2*9) = 0.426667
    # t=20: n1=4, n2=4, d=1, d1=0: O-E = -0.5;             V = 4*4*1*7/(8^2*7) = 0.25
    # t=30: n1=3, n2=3, d=1, d1=1: O-E = 0.5;              V = 3*3*1*5/(6^2*5) = 0.25
    # chi2 = 0.8^2 / 0.926667 = 0.690647; p = 2*(1 - Phi(sqrt(chi2))) = 0.405944
    chi2, p = logrank([10, 10, 20, 30, 30, 30], [True, True, False, True, False, False],
                      [20, 30, 30, 30], [True, False, False, False])
    assert (chi2, p) == pytest.approx((0.690647, 0.405944), abs=1e-6)
    assert all(math.isnan(x) for x in logrank([5], [False], [5], [False]))


# -- logistic regression ----------------------------------------------------------------------------------------


def _two_by_two(a: int, b: int, c: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """x=1: a with y=1, b with y=0; x=0: c with y=1, d with y=0."""
    x = np.array([1.0] * (a + b) + [0.0] * (c + d))
    y = np.array([1.0] * a + [0.0] * b + [1.0] * c + [0.0] * d)
    return x[:, None], y


def test_logistic_regression_on_a_two_by_two_table_is_the_log_odds_ratio():
    # The MLE of a saturated 2x2 table: slope = ln(ad/bc) = ln(30*25/(10*15)) = ln 5 = 1.609438, Woolf's
    # SE sqrt(1/30 + 1/10 + 1/15 + 1/25) = 0.489898; intercept = ln(c/d) = ln(15/25) = -0.510826 with
    # SE sqrt(1/15 + 1/25) = 0.326599.
    x, y = _two_by_two(30, 10, 15, 25)
    fit = logistic_regression(x, y, ["x"], standardize=False)
    (b0, b1) = fit.coefficients
    assert fit.converged and not fit.separated and (fit.n, fit.events) == (80, 45)
    assert (b1.estimate, b1.se) == pytest.approx((1.609438, 0.489898), abs=1e-6)
    assert (b0.estimate, b0.se) == pytest.approx((-0.510826, 0.326599), abs=1e-6)
    assert (b1.low, b1.high) == pytest.approx((1.609438 - 1.959964 * 0.489898, 1.609438 + 1.959964 * 0.489898),
                                              abs=1e-5)
    # Standardised features give the same per-unit slope; per SD it is the slope times the SD of x.
    std = logistic_regression(x, y, ["x"]).coefficients[1]
    assert (std.estimate, std.se) == pytest.approx((b1.estimate, b1.se), abs=1e-8)
    assert std.per_sd[0] == pytest.approx(b1.estimate * np.std(x, ddof=1), abs=1e-8)


def test_logistic_regression_solves_the_score_equations_and_reports_what_it_cannot_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)) * [1.0, 5.0] + [0.0, 3.0]
    y = (rng.random(200) < 1 / (1 + np.exp(-(0.5 + 1.0 * x[:, 0] - 0.2 * x[:, 1])))).astype(float)
    fit = logistic_regression(np.column_stack([x, np.ones(200), 2 * x[:, 0]]), y, ["a", "b", "const", "twice_a"])
    assert fit.dropped == {"const": "constant", "twice_a": "collinear with a, b"}
    b = np.array([c.estimate for c in fit.coefficients])
    # At the MLE the score X'(y - p) is zero (the intercept is at the means of the standardised columns).
    design = np.column_stack([np.ones(200), x])
    intercept = b[0] - (b[1:] * x.mean(axis=0)).sum()
    p = 1 / (1 + np.exp(-(design @ np.r_[intercept, b[1:]])))
    assert np.abs(design.T @ (y - p)).max() < 1e-6
    # Complete separation: no MLE exists, and it is said.
    sep = logistic_regression(np.arange(10.0)[:, None], (np.arange(10) >= 5).astype(float), ["x"])
    assert sep.separated and math.isnan(sep.coefficients[1].low)
    # No variation in the outcome: nothing to fit.
    assert logistic_regression(np.arange(5.0)[:, None], np.ones(5), ["x"]).separated


# -- small pieces -----------------------------------------------------------------------------------------------


def test_counts_tokens_and_bins():
    text = "Paris is big. PARIS, paris! Parisian Paris-based New York and new york."
    assert count_terms(text, ["Paris", "New York", "York", " "]) == {"Paris": 4, "New York": 2, "York": 2}
    assert token_category(" the") == "function word"
    assert token_category(" ,") == "punctuation/space" and token_category("\n") == "punctuation/space"
    assert token_category(" Lond", "London") == "alternative"
    assert token_category(" Berlin", "London") == "other"
    assert quantile_edges([1, 2, 3, 4, 5], 4) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert quantile_edges([2, 2, 2], 4) == [2.0, 2.0]


def test_target_rank_is_recorded_alike_batched_and_unbatched(tiny_llama):
    from bench.reference import score_probes_unbatched
    from retention.records import Probe
    from retention.scoring import score_probes

    model, tok = tiny_llama
    probes = [Probe("The capital of France is", "Paris", "London"), Probe("Toko Yasuda plays the", "guitar", "piano")]
    batched = score_probes(model, tok, probes, ("top1", "prob"))
    reference = score_probes_unbatched(model, tok, probes, ("top1", "prob"))
    assert [r.target_rank for r in batched] == [r.target_rank for r in reference]
    for r in batched:
        assert (r.target_rank == 0) == r.passed["top1"] and r.to_dict()["target_rank"] == r.target_rank
        assert 0 <= r.target_rank <= 100  # capped: deep ranks move with float noise


# -- a tiny study -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_llama) -> Path:
    """Two seeds of the tiny run (ROME batch on 3 facts, 6 controls, K = 2 phrasings, 3 steps measured at 0, 2,
    3), as a study folder."""
    root = tmp_path_factory.mktemp("analysis")
    mp = pytest.MonkeyPatch()
    mp.setenv("RETENTION_CACHE", str(root / "cache"))
    try:
        prepare(root, tiny_llama[1])
        config = fit_config(root, protocols=["top1", "prob"])
        config["paraphrases"] = {"k": 2}
        (root / "base.yaml").write_text(yaml.safe_dump(config))
        study = {"name": "tiny", "base": "base.yaml", "out_dir": str(root / "studies"), "seeds": [0, 1]}
        (root / "tiny.yaml").write_text(yaml.safe_dump(study))
        assert cli_main(["study", "--config", str(root / "tiny.yaml")]) == 0
    finally:
        mp.undo()
    return root / "studies" / "tiny"


def _corpus(folder: Path, path: Path) -> list[str]:
    """A corpus naming each subject of the study's facts twice (once upper-cased) and once inside a word."""
    from retention.data.readers import load_records

    records = {str(r.case_id): r for r in load_records("builtin")}
    subjects = []
    for run in (folder / "runs").iterdir():
        run_info = json.loads((run / "summary.json").read_text())["run"]
        subjects += [records[c].subject for c in run_info["edit_case_ids"] + run_info["control_case_ids"]]
    path.write_text("\n".join(f"{s} and {s.upper()}; x{s}x." for s in subjects), encoding="utf-8")
    return subjects


def test_features_of_a_tiny_study(tiny_study, tmp_path):
    from retention.callbacks.augmentation import phrasings
    from retention.data.readers import load_records
    from retention.models import load_tokenizer
    from retention.study.analysis import load_facts

    subjects = _corpus(tiny_study, tmp_path / "corpus.txt")
    facts, notes = load_facts([tiny_study], corpus=str(tmp_path / "corpus.txt"))
    assert any("corpus frequencies from file:corpus.txt" in n for n in notes)
    records = {str(r.case_id): r for r in load_records("builtin")}
    tokenizer = load_tokenizer(str(tiny_study.parent.parent / "model"))
    assert {f.seed for f in facts} == {0, 1}
    assert sum(f.set == "edited" for f in facts) == 6 and sum(f.set == "intrinsic" for f in facts) == 12
    for f in facts:
        run = tiny_study / "runs" / f.run
        summary = json.loads((run / "summary.json").read_text())
        group = "edit" if f.set == "edited" else "control"
        t0 = next(r for r in read_probes(run)[0] if r["case_id"] == f.case_id and r["group"] == group)
        record = records[f.case_id]
        x = f.features
        # Edited: new minus true target log-prob; intrinsic: true minus new (the probe's target minus alternative).
        assert x["margin_t0"] == pytest.approx(t0["target_logprob"] - t0["alt_logprob"])
        assert (t0["target"], t0["alternative"]) == ((record.target_new, record.target_true) if f.set == "edited"
                                                     else (record.target_true, record.target_new))
        assert x["target_rank_t0"] == t0["target_rank"]
        assert x["relation"] == record.relation_id and x["subject"] == record.subject
        text = record.subject if record.prompt.startswith("{}") else " " + record.subject
        assert x["subject_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert x["subject_freq"] == 2 * subjects.count(record.subject)  # x<subject>x is not a whole word
        assert x["steps"] == 3 and x["n_edit"] == 3 and x["log10_lr"] == pytest.approx(-2)
        assert f.steps == (0, 2, 3)
        if f.set == "edited":
            diag = next(d for d in summary["run"]["edit_diagnostics"] if d["case_id"] == f.case_id)
            assert x["update_norm"] == diag["delta_norm"] and x["relative_update"] == diag["relative_update"]
            assert x["layer"] == 0 and x["n_layers"] == 1 and x["k_nominal"] == 2
            assert x["k"] == len(phrasings(record, 2, "record", f.seed))
        else:
            assert "update_norm" not in x


def test_report_analysis_writes_the_files(tiny_study, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    _corpus(tiny_study, corpus)
    out = tmp_path / "rep"
    assert cli_main(["report", str(tiny_study), "--out", str(out), "--analysis", "true",
                     "--analysis_corpus", str(corpus)]) == 0
    assert "analysis (" in capsys.readouterr().out
    a = out / "analysis"
    for name in ("survival.csv", "survival.md", "survival_all.png", "logrank.csv", "facts.csv", "predictors.csv",
                 "predictors.md", "models.csv", "relations.csv", "matched.csv", "matched.md",
                 "protocol_sensitivity.csv", "protocol_sensitivity.md", "protocol_sensitivity_summary.csv",
                 "single_features.csv", "dose.csv", "dose.md", "curves.csv", "curves_tiny.png", "decomposition.csv"):
        assert (a / name).is_file(), name
    survival = list(csv.DictReader((a / "survival.csv").open()))
    prob = [r for r in survival if r["protocol"] == "prob" and r["set"] == "edited"]
    # Both seeds' edited facts pooled; t=0 first, survival never rises.
    assert prob[0]["step"] == "0" and prob[0]["survival"] == "1" and prob[0]["n_runs"] == "2"
    s = [float(r["survival"]) for r in prob]
    assert s == sorted(s, reverse=True)
    facts = list(csv.DictReader((a / "facts.csv").open()))
    assert len(facts) == (6 + 12) * 2  # facts x protocols
    models = list(csv.DictReader((a / "models.csv").open()))
    assert {m["model"] for m in models} <= {"edited", "intrinsic", "edited vs intrinsic"}
    matched = list(csv.DictReader((a / "matched.csv").open()))
    alls = [m for m in matched if m["bin"] == "all" and m["protocol"] == "prob" and m["by"] == "margin_t0"]
    binned = [m for m in matched if m["bin"] != "all" and m["protocol"] == "prob" and m["by"] == "margin_t0"]
    assert sum(int(m["edited_n"]) + int(m["intrinsic_n"]) for m in binned) == \
           int(alls[0]["edited_n"]) + int(alls[0]["intrinsic_n"])
    assert "# Lost under `top1`, kept under `prob`" in (a / "protocol_sensitivity.md").read_text()
    assert "# What predicts survival" in (a / "predictors.md").read_text()
    assert "# Format shift or real loss" in (a / "protocol_sensitivity.md").read_text()
    curves = [r for r in csv.DictReader((a / "curves.csv").open()) if r["protocol"] == "prob" and r["set"] == "edited"]
    # An instruct task's examples vary in length: steps, no token count.
    assert [int(r["step"]) for r in curves] == [0, 2, 3] and all(r["tokens"] == "nan" for r in curves)
    assert int(curves[0]["at_risk"]) == int(prob[0]["at_risk"])


def test_write_analysis_without_a_corpus_leaves_frequencies_out(tiny_study, tmp_path):
    paths = write_analysis([tiny_study], tmp_path / "a", corpus=str(tmp_path / "absent.txt"), plots=False)
    assert "corpus frequencies left out" in paths["survival_md"].read_text()
    row = next(csv.DictReader(paths["facts"].open()))
    assert row["subject_freq"] == "nan"


# -- the dose-response study files ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOSE_STUDIES, ids=[p.stem for p in DOSE_STUDIES])
def test_dose_studies_parse(path):
    spec = StudySpec.from_file(path)
    runs = spec.expand()
    assert runs and len({r.name for r in runs}) == len(runs)
    assert all(isinstance(p, Path) and p.is_file() for p in spec.base)


def test_probes_that_lost_top1_but_kept_prob_are_classified():
    from retention.study.analysis.decomposition import sensitivity_rows, sensitivity_summary
    from retention.study.results import Condition, RunResult

    def row(case, top1, prob, token, rank, group="control"):
        return {"group": group, "case_id": case, "kind": group, "prompt": f"{case} is in", "target": "Paris",
                "alternative": "London", "passed": {"top1": top1, "prob": prob}, "target_logprob": -1.0,
                "alt_logprob": -2.0, "top1_token": token, "target_rank": rank}

    t0 = [row("a", True, True, " Paris", 0), row("b", True, True, " Paris", 0), row("c", True, True, " Paris", 0),
          row("d", False, True, " the", 3), row("e", True, True, " Paris", 0)]
    end = [row("a", False, True, " the", 2), row("b", False, True, " Lond", 1), row("c", True, True, " Paris", 0),
           row("d", False, True, " the", 4), row("e", False, False, " London", 1)]
    run = RunResult(Condition("s", "all", "arm"), 0, None, {}, Path("r"))
    rows = sensitivity_rows([(run, {0: t0, 5: end})])
    # c kept top1, d did not pass top1 at t=0, e lost prob too: only a and b.
    assert [(r["case_id"], r["category"], r["rank_t0"], r["rank_final"]) for r in rows] == [
        ("a", "function word", 0, 2), ("b", "alternative", 0, 1)]
    (summary,) = sensitivity_summary(rows, {("s", "all", "arm", "control"): 4})
    assert (summary["lost_top1_kept_prob"], summary["function_word"], summary["alternative"]) == (2, 1, 1)
    assert (summary["passing_both_t0"], summary["median_rank_final"], summary["function_word_share"]) == (4, 1.5, 0.5)


def test_a_feature_most_runs_did_not_record_is_left_out_not_the_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    y = (x[:, 0] + rng.normal(size=60) > 0).astype(float)
    x[:45, 1] = np.nan  # recorded for a quarter of the facts only
    fit = logistic_regression(x, y, ["a", "b"])
    assert fit.n == 60 and [c.name for c in fit.coefficients][1:] == ["a"]
    assert fit.dropped == {"b": "not recorded for 75% of the facts"}


# -- dose-response, curves, one feature at a time, loss classes ------------------------------------------------------


_CASE_IDS = itertools.count()


def _fact(cell: str, run: str, name: str, passes: dict, t0: dict | None = None, final: dict | None = None,
          case_id: str | None = None, **features):
    """A fact of study ``s``, arm ``baseline``; a case id of its own unless ``case_id`` is given."""
    from retention.study.analysis import Fact

    steps = (0, 10, 20)
    case_id = case_id or f"case{next(_CASE_IDS)}"
    return Fact(study="s", cell=cell, arm="baseline", seed=0, run=run, case_id=case_id, set=name, steps=steps,
                passed=passes, t0=t0 or {}, final=final or {}, features=features)


def test_auc_by_hand():
    from retention.study.analysis.regression import auc

    assert auc([1, 2, 3, 4], [False, False, True, True])[0] == 1.0
    assert auc([1, 2, 3, 4], [True, True, False, False])[0] == 0.0
    # positives {2, 3} vs negatives {1, 3}: pairs (2>1) 1, (2<3) 0, (3>1) 1, (3=3) 0.5 -> 2.5 / 4
    a, low, high = auc([2, 3, 1, 3], [True, True, False, False])
    assert a == 0.625 and 0 <= low < a < high <= 1
    assert math.isnan(auc([1, 2], [True, True])[0])


def test_dose_rows_pool_facts_per_dose_value_and_fit_a_trend():
    from retention.study.analysis.dose import dose_rows
    from retention.study.spec import cell_label

    facts = []
    # K = 0: 1 of 4 edited facts kept; K = 2: 2 of 4; K = 8: 4 of 4 (a fact failing top1 at t=0 is not at risk).
    for k, kept in ((0, 1), (2, 2), (8, 4)):
        for i in range(4):
            ok = i < kept
            facts.append(_fact(cell_label([("paraphrases.k", str(k)), ("paraphrases.source", "record")]), f"r{k}", "edited",
                               {"top1": (True, True, ok)}, i=i))
        facts.append(_fact(cell_label([("paraphrases.k", str(k)), ("paraphrases.source", "record")]), f"r{k}", "edited",
                           {"top1": (False, True, True)}, i=9))
        facts.append(_fact(cell_label([("paraphrases.k", str(k)), ("paraphrases.source", "record")]), f"r{k}", "intrinsic",
                           {"top1": (True, False, False)}))
    rows = dose_rows(facts)
    points = {(r["set"], r["value"]): r for r in rows if r["value"] != "trend"}
    assert {r["dose"] for r in rows} == {"paraphrases.k"}  # the source is not numeric
    assert {r["series"] for r in rows} == {"paraphrases.source=record"}
    assert [(points[("edited", x)]["kept"], points[("edited", x)]["n"]) for x in (0.0, 2.0, 8.0)] == \
           [(1, 4), (2, 4), (4, 4)]
    assert (points[("intrinsic", 8.0)]["kept"], points[("intrinsic", 8.0)]["n"]) == (0, 1)
    assert points[("edited", 2.0)]["rate"] == 0.5 and points[("edited", 2.0)]["low"] < 0.5 < points[("edited", 2.0)]["high"]
    trend = next(r for r in rows if r["value"] == "trend" and r["set"] == "edited")
    assert trend["n"] == 12 and trend["kept"] == 7 and trend["rate"] > 0
    # Two values are not a dose: no rows.
    assert dose_rows([f for f in facts if f.run != "r8"]) == []


def test_tokens_per_step_of_packed_text_only():
    from retention.study.analysis.features import tokens_per_step

    text = {"data": {"batch_size": 4, "task": {"family": "text", "block_size": 64}},
            "trainer": {"devices": 2, "num_nodes": 1, "accumulate_grad_batches": 3}}
    assert tokens_per_step(text) == 4 * 64 * 2 * 3
    assert tokens_per_step(text, world_size=8) == 4 * 64 * 8 * 3  # the run's recorded world size wins
    text["trainer"]["devices"] = "auto"  # not resolved in the config and no world size recorded: one rank
    assert tokens_per_step(text) == 4 * 64 * 3
    assert math.isnan(tokens_per_step({"data": {"task": {"family": "instruct"}}}))


def test_curve_rows_count_the_facts_passing_at_each_step():
    from retention.study.analysis.dose import curve_rows

    facts = [_fact("all", "r", "edited", {"prob": (True, True, False)}, tokens_per_step=256.0),
             _fact("all", "r", "edited", {"prob": (True, None, True)}, tokens_per_step=256.0),
             _fact("all", "r", "edited", {"prob": (False, True, True)}, tokens_per_step=256.0)]
    rows = curve_rows(facts)
    assert [(r["step"], r["tokens"], r["passing"], r["at_risk"]) for r in rows] == [
        (0, 0.0, 2, 2), (10, 2560.0, 1, 1), (20, 5120.0, 1, 2)]


def test_single_feature_rows_rank_a_perfect_and_a_useless_predictor():
    from retention.study.analysis.regression import single_feature_rows

    facts = []
    for i in range(12):
        survived = i % 3 != 0
        facts.append(_fact("all", "r", "edited", {"top1": (True, True, survived)},
                           margin_t0=float(i) + (0.0 if survived else -0.5), k=float(i % 2)))
    rows = {r["feature"]: r for r in single_feature_rows(facts)}
    assert set(rows) == {"margin_t0", "k"}
    assert rows["k"]["n"] == 12 and rows["k"]["survived"] == 8
    # k alternates independently of survival (2 of 6 lost on each side): AUC 0.5, a flat slope.
    assert rows["k"]["auc"] == 0.5 and rows["k"]["per_sd_low"] < 0 < rows["k"]["per_sd_high"]
    assert rows["margin_t0"]["auc"] > 0.5


def test_loss_classes_and_decomposition():
    from retention.study.analysis.decomposition import decomposition_rows, loss_class

    def rec(top1, tlp, alp, token, rank):
        return {"passed": {"top1": top1, "prob": tlp > alp}, "target_logprob": tlp, "alt_logprob": alp,
                "top1_token": token, "target_rank": rank, "alternative": "London"}

    t0 = rec(True, -0.5, -5.0, " Paris", 0)
    cases = {"kept": rec(True, -0.6, -5.0, " Paris", 0), "format shift": rec(False, -2.0, -5.0, " the", 1),
             "displaced": rec(False, -2.0, -5.0, " France", 2), "buried": rec(False, -6.0, -9.0, ",", 40),
             "overturned": rec(False, -6.0, -3.0, " Lond", 1)}
    for expected, final in cases.items():
        assert loss_class(t0, final) == expected
    facts = [_fact("all", "r", "intrinsic", {"top1": (True, True, final["passed"]["top1"]),
                                             "prob": (True, True, final["passed"]["prob"])}, t0=t0, final=final)
             for final in cases.values()]
    (row,) = decomposition_rows(facts)
    assert row["top1_t0"] == 5 and [row[c] for c in ("kept", "format_shift", "displaced", "buried", "overturned")] \
        == [1, 1, 1, 1, 1]
    assert (row["top1_kept"], row["top1_n"], row["prob_kept"], row["prob_n"]) == (1, 5, 4, 5)
    assert (row["top5_kept"], row["top5_n"], row["top10_kept"], row["top10_n"]) == (4, 5, 4, 5)
    assert row["median_rank_final"] == 1 and row["median_delta_logprob"] == pytest.approx(-1.5)
