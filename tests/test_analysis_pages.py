"""What the analysis pages and figures show a reader: predictors.md leads with the answer and keeps the
warnings in one column; a panel where nothing passed at t=0 says so instead of staying blank; and the runnable
examples in the docstrings of the study's table and analysis modules."""

from __future__ import annotations

import doctest
import importlib

import pytest

from retention.study.analysis.markdown import predictors_markdown
from retention.study.results import Condition


def _model(arm: str, model: str, separated: bool = False, epv: float = 12.0) -> dict:
    return {"study": "s", "arm": arm, "protocol": "top1", "model": model, "n": 80, "survived": 60, "clusters": 40,
            "events_per_feature": epv, "converged": not separated, "separated": separated,
            "log_likelihood": -30.0, "dropped": "k (constant); lr (collinear with margin_t0, k)"}


def _slope(arm: str, model: str, feature: str, est: float, low: float, high: float) -> dict:
    return {"study": "s", "arm": arm, "protocol": "top1", "model": model, "feature": feature, "estimate": est,
            "se": 0.1, "ci_low": low, "ci_high": high, "sd": 1.0, "per_sd": est, "per_sd_low": low,
            "per_sd_high": high, "odds_ratio_per_sd": 2.0, "excludes_zero": low > 0 or high < 0, "n": 80,
            "separated": False}


def test_predictors_page_leads_with_the_answer_and_keeps_warnings_in_a_column():
    models = [_model("base", "edited", epv=3.0), _model("base", "intrinsic"), _model("frozen", "edited", True)]
    coef = [_slope("base", "edited", "(intercept) at the means", 1.0, 0.5, 1.5),
            _slope("base", "edited", "margin_t0", 0.9, 0.3, 1.5),
            _slope("base", "edited", "subject_tokens", 0.1, -0.4, 0.6),
            _slope("base", "intrinsic", "margin_t0", 0.2, -0.3, 0.7),
            _slope("frozen", "edited", "margin_t0", 40.0, float("nan"), float("nan"))]
    page = predictors_markdown(coef, models, [])
    answer = page[page.index("## The answer"):page.index("## Models")]
    assert page.index("## The answer") < page.index("## Method")
    # The one slope whose interval excludes zero, with its interval; its model's warning in the caution column.
    assert "`margin_t0`: the interval excludes zero in 1 of the 2 fits that estimate it" in answer
    assert "| s: base | edited | top1 | margin_t0 | +0.90 [+0.30, +1.50] | 2.00 | 60/80 | EPV 3.0 |" in answer
    assert "- In no fit: `subject_tokens`." in answer and "| subject_tokens |" not in answer
    assert "intercept" not in answer
    assert "2 of 3 models could be fitted (1 separated" in answer
    # One row per model, warnings compact; no paragraph of warnings per model.
    assert "| s: frozen | edited | top1 | 80 (40) | 60 | n/a | separated | constant: k; collinear: lr |" in page
    assert "expect biased" not in page and page.count("EPV 3.0") == 4  # answer, models and two slope rows


def test_predictors_page_says_when_no_slope_excludes_zero():
    page = predictors_markdown([_slope("base", "edited", "margin_t0", 0.1, -0.2, 0.4)], [_model("base", "edited")],
                               [])
    assert "No slope's 95 % interval excludes zero in any of the 1 fitted models." in page


def _texts(fig) -> list[list[str]]:
    return [[t.get_text() for t in ax.texts] for ax in fig.axes]


def test_survival_panel_where_nothing_passed_at_t0_says_so(monkeypatch, tmp_path):
    from retention.study.analysis import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)

    def km(arm, protocol):
        return [{"arm": arm, "protocol": protocol, "set": "edited", "step": s, "n_facts": 4, "survival": v,
                 "ci_low": v, "ci_high": v} for s, v in ((0, 1.0), (10, 0.5))]

    rows = km("base", "top1") + km("base", "prob") + km("frozen", "prob")  # frozen: nothing passed top1 at t=0
    plots.plot_survival(rows, tmp_path / "s.png", "s")
    texts = _texts(figures[0])
    assert texts == [[], [], ["no fact passed top1 at t=0"], []]  # panels row by row: base top1, prob; frozen
    assert figures[0].axes[2].get_legend() is None and figures[0].axes[3].get_legend() is not None


def test_report_panel_where_no_probe_passed_at_t0_says_so(monkeypatch, tmp_path):
    from retention.study import figures as figs
    from retention.study.report import Aggregate

    saved = []
    monkeypatch.setattr(figs, "save_figure", lambda fig, path: saved.append(fig) or path)

    def counts(top1_n):
        return {0: {g: {"top1": (top1_n, top1_n), "prob": (4, 4)} for g in ("edit", "control")},
                10: {g: {"top1": (0, top1_n), "prob": (3, 4)} for g in ("edit", "control")}}

    aggs = [Aggregate(Condition("s", "all", "base"), [0], 1, {0: counts(4)}),
            Aggregate(Condition("s", "all", "frozen"), [0], 1, {0: counts(0)})]
    figs.plot_report_curves(aggs, tmp_path / "c.png", "s")
    assert _texts(saved[0]) == [[], [], ["no probe passed top1 at t=0"], []]
    assert saved[0].axes[1].get_legend() is not None  # the legend stays where it was (top right)


def test_report_final_panel_where_no_probe_passed_at_t0_says_so(monkeypatch, tmp_path):
    from retention.study import figures as figs
    from retention.study.report import Aggregate

    saved = []
    monkeypatch.setattr(figs, "save_figure", lambda fig, path: saved.append(fig) or path)
    counts = {10: {g: {"top1": (0, 0), "prob": (3, 4)} for g in ("edit", "control")}}
    figs.plot_final([Aggregate(Condition("s", "all", "base"), [0], 1, {0: counts})], tmp_path / "f.png")
    assert _texts(saved[0]) == [["no probe passed top1 at t=0"], []]


@pytest.mark.parametrize("module", ["retention.study.tables", "retention.data.phrasings",
                                    "retention.study.analysis.facts", "retention.study.analysis.features",
                                    "retention.study.analysis.markdown", "retention.study.analysis.survival",
                                    "retention.study.analysis.regression", "retention.study.analysis.matched",
                                    "retention.study.analysis.decomposition", "retention.study.stats"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
