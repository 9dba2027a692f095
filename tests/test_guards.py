"""Guards against results that go wrong without a word: non-finite or absurd edits, a collapsed fine-tune,
facts top1 cannot judge, malformed records skipped uncounted."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import DATA, needs_data
from editing_models import FACT, OTHER, edit_model
from tiny_runs import fit_config, prepare

from retention.arch import ArchAdapter
from retention.callbacks.apply_edits import ApplyEdits
from retention.callbacks.monitor import RetentionMonitor
from retention.commands.edit import EditArgs
from retention.commands.edit import run as run_edit_command
from retention.data.readers import load_records
from retention.data.selection import KnowledgeSets
from retention.editing.base import (
    EditError,
    Editor,
    EditorHParams,
    EditResult,
    RequestDiagnostics,
    run_edits,
)
from retention.editing.ft import FtHParams
from retention.editing.rome import RomeEditor, RomeHParams
from retention.editing.targets import TargetHParams, optimise_targets
from retention.records import KnowledgeRecord
from retention.scoring import top1_blind
from retention.summary import collapse, format_table

# -- non-finite v*/z losses and updates ---------------------------------------------------------------------------


def test_a_non_finite_target_loss_names_the_request_and_the_step(tiny_llama):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer)).train()
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)  # above the edited layer: v₀ is finite, the loss is not
    hp = TargetHParams(v_steps=5, v_weight_decay=0.0, clamp_norm_factor=1e4)
    # It used to count as converged (NaN < early_stop_loss is false), giving δ = 0 without a word.
    with pytest.raises(EditError, match=r"edit request 2 .*'The instrument played by Toko Yasuda' -> 'piano'.*"
                                        r"non-finite v\*/z loss nan at step 1 of 5.*lower v_lr"):
        optimise_targets(model, tokenizer, [OTHER], ["{}"], hp, 0)
    assert model.training and all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.fixture
def cache(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))


def _rome(**kw) -> RomeEditor:
    return RomeEditor(RomeHParams(**{"layer": 0, "context_templates": [[3, 1]], "v_steps": 5, "v_weight_decay": 0.0,
                                     "clamp_norm_factor": 1e4, "mom2_adjustment": False, **kw}))


def test_rome_refuses_a_nan_loss_instead_of_a_silent_zero_edit(tiny_llama, cache):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    editor = _rome()
    editor.prepare(model, tokenizer)  # context templates sampled from the model while it is still finite
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)
    weight = ArchAdapter.for_model(model).mlp_out_weight(0)
    before = weight.detach().clone()
    with pytest.raises(EditError, match="edit request 1 .*non-finite v\\*/z loss"):
        run_edits(editor, model, tokenizer, [FACT], "batch")
    assert torch.equal(weight, before)


class _Fixed(Editor):
    """An editor whose update is ``factor`` × the layer-0 MLP output weight (``nan`` for a NaN update)."""

    name = "fixed"
    hparams_class = EditorHParams

    def __init__(self, factor: float, **hparams):
        super().__init__(EditorHParams(**hparams))
        self.factor = factor

    def edit(self, model, tokenizer, requests):
        adapter = ArchAdapter.for_model(model)
        delta = adapter.mlp_out_weight(0).detach().float() * self.factor
        return EditResult(self.name, {f"{adapter.mlp_out_name(0)}.weight": delta}, [0], [r.case_id for r in requests],
                          [RequestDiagnostics(r.case_id) for r in requests])


@pytest.fixture
def model_and_weight(tiny_llama):
    model = edit_model("llama", len(tiny_llama[1]))
    weight = ArchAdapter.for_model(model).mlp_out_weight(0)
    return model, weight, weight.detach().clone()


def test_any_editors_non_finite_update_is_refused_before_it_is_applied(tiny_llama, model_and_weight):
    model, weight, before = model_and_weight
    with pytest.raises(EditError, match=r"edit request 1 .*non-finite fixed update of model\.layers\.0\.mlp"):
        run_edits(_Fixed(math.nan), model, tiny_llama[1], [FACT], "sequential")
    assert torch.equal(weight, before)


def test_an_absurd_update_is_refused_naming_the_weight_and_the_request(tiny_llama, model_and_weight):
    model, weight, before = model_and_weight
    with pytest.raises(EditError, match=r"edit request 1 .*edit request 2 .*update of model\.layers\.0\.mlp\.down_proj"
                                        r"\.weight has ‖ΔW‖/‖W‖ = 1e\+32, above max_relative_update=10.*not applied"):
        run_edits(_Fixed(1e32), model, tiny_llama[1], [FACT, OTHER], "batch")
    assert torch.equal(weight, before)


def test_an_absurd_update_under_warn_is_logged_and_applied(tiny_llama, model_and_weight, caplog):
    model, weight, before = model_and_weight
    with caplog.at_level(logging.WARNING, logger="retention.editing.base"):
        (result,) = run_edits(_Fixed(20.0, on_large_update="warn"), model, tiny_llama[1], [FACT], "batch")
    assert "‖ΔW‖/‖W‖ = 20, above max_relative_update=10" in caplog.text and "applied anyway" in caplog.text
    assert torch.allclose(weight, before * 21) and result.diagnostics[0].relative_update == pytest.approx(20)


def test_the_relative_update_is_recorded_and_a_normal_rome_edit_is_far_below_the_limit(tiny_llama, cache):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    name = f"{ArchAdapter.for_model(model).mlp_out_name(0)}.weight"
    norm = model.get_parameter(name).detach().norm().item()
    (result,) = run_edits(_rome(), model, tokenizer, [FACT], "batch")
    (diag,) = result.diagnostics
    assert diag.relative_update == pytest.approx(result.deltas[name].norm().item() / norm, rel=1e-5)
    assert 0 < diag.relative_update < 1


@pytest.mark.parametrize("cls,kw,match", [
    (RomeHParams, {"max_relative_update": 0}, "max_relative_update=0.0: must be > 0"),
    (RomeHParams, {"on_large_update": "ignore"}, "on_large_update='ignore': choose from error, warn"),
    (FtHParams, {"on_large_update": "ignore"}, "on_large_update='ignore'"),
])
def test_the_update_guard_settings_are_checked(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls.from_dict(kw)


# -- a collapsed fine-tune --------------------------------------------------------------------------------------


def _rows(*losses):
    return [{"step": 10 * i, "val/loss": loss} for i, loss in enumerate(losses)]


@pytest.mark.parametrize("losses,expected", [
    ((2.0, 1.5), None),
    ((2.0, 3.9), None),
    ((2.0, 4.1), "more than 2× its 2.000 at step 0"),
    ((5.0, 9.8), "at least 0.9·ln(49152) = 9.722, near a uniform guess (it was 5.000 at step 0)"),
    ((10.5, 10.6), None),  # a random model starts near uniform: nothing to collapse from
    ((2.0, math.nan), "validation loss is nan at step 10"),
    ((2.0,), None),
    ((), None),
])
def test_collapse_thresholds(losses, expected):
    reason = collapse(_rows(*losses), 49152)
    assert reason is None if expected is None else expected in reason


def test_collapse_ignores_rows_without_a_validation_loss():
    assert collapse([{"step": 0, "val/accuracy": 0.5}, {"step": 3, "val/accuracy": 0.0}], 100) is None


def test_a_collapsed_run_is_flagged_in_summary_and_reports(tmp_path, tiny_llama, cache, capsys):
    prepare(tmp_path, tiny_llama[1])
    config = fit_config(tmp_path, "collapsed")
    config["model"]["optimizer"]["lr"] = 10.0
    config["edits"]["cache"] = False
    path = tmp_path / "collapsed.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    from retention.commands.fit import main

    assert main(["--config", str(path)]) == 0
    summary = json.loads((tmp_path / "runs" / "collapsed" / "summary.json").read_text())
    downstream = summary["downstream"]
    assert downstream["collapsed"] is True and "validation loss" in downstream["collapse_reason"]
    assert "WARNING: fine-tuning collapsed the model" in format_table(summary)
    assert "WARNING: fine-tuning collapsed the model" in capsys.readouterr().out  # `retention fit`'s own report
    run = summary["run"]
    assert run["read_records"] >= run["candidates"] and run["skipped_records"] == 0
    assert isinstance(run["top1_blind_edits"], int) and isinstance(run["task_examples_dropped"], int)
    assert all(0 < d["relative_update"] < 10 for d in run["edit_diagnostics"])


def test_the_table_has_no_warning_for_a_run_that_did_not_collapse():
    summary = {"protocols": [], "retention": {}, "t0": {}, "final_step": 3, "run": {},
               "downstream": {"collapsed": False}}
    assert "WARNING" not in format_table(summary)


# -- facts top1 cannot judge ------------------------------------------------------------------------------------


def _record(case_id: str, new: str, true: str) -> KnowledgeRecord:
    return KnowledgeRecord(case_id, "Danielle Darrieux", "The mother tongue of {} is", "P103", new, true)


def test_top1_blind_finds_targets_sharing_their_first_token(tiny_llama):
    tokenizer = tiny_llama[1]
    records = [_record("1", "English", "French"), _record("2", "Paris Hilton", "Paris"),
               _record("3", "New York City", "New Delhi")]
    assert top1_blind(tokenizer, records) == ["2", "3"]


@needs_data
def test_a_quarter_of_the_shared_zsre_file_is_top1_blind(tiny_llama):
    records = load_records(DATA / "zsre" / "zsre_mend_train-1k.json", on_error="skip")
    assert (len(top1_blind(tiny_llama[1], records)), len(records)) == (249, 981)


def test_monitor_counts_and_warns_about_top1_blind_edits(tiny_llama, monkeypatch):
    from retention.callbacks import monitor as monitor_module
    from retention.callbacks.probing import Measurement
    from retention.pipeline_contract import PipelineState

    sets = KnowledgeSets([_record("1", "English", "French"), _record("2", "Paris Hilton", "Paris")], [])
    monkeypatch.setattr(monitor_module, "measure", lambda *a, **k: (Measurement(0, {"accuracy": {}, "retention": {}},
                                                                                 0.0), []))
    trainer = SimpleNamespace(strategy=None, world_size=1, ckpt_path=None, loggers=[])
    module = SimpleNamespace(model=None, tokenizer=tiny_llama[1], pipeline=PipelineState())
    with pytest.warns(UserWarning, match=r"1 of 2 edit records \(case ids 2\).*top1 cannot tell.*prob or gen"):
        RetentionMonitor(protocols=["top1", "prob"], share_t0=False).on_edits_applied(trainer, module, sets)
    assert module.pipeline.stats["top1_blind_edits"] == 1
    module.pipeline = PipelineState()
    RetentionMonitor(protocols=["prob"], share_t0=False).on_edits_applied(trainer, module, sets)
    assert "top1_blind_edits" not in module.pipeline.stats  # not scored under top1: nothing to flag
    assert module.pipeline.protocols == ("prob",) and len(module.pipeline.measurements) == 1


def test_retention_edit_counts_and_warns_about_top1_blind_facts(tmp_path, tiny_llama, cache, capsys):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([_record("2", "Paris Hilton", "Paris").to_dict()]), encoding="utf-8")
    settings = {"layer": 0, "v_steps": 2, "mom2_adjustment": False, "context_templates": [[3, 1]]}
    args = EditArgs(model="tiny-llama", editor="rome", hparams="smollm2-135m", data=str(path), n=1,
                    select_known="none", out=str(tmp_path / "run"), save_model=False, set=settings)
    assert run_edit_command(args)["top1_blind_edits"] == 1
    assert "WARNING: 1 of 1 facts have target_new and target_true with the same first token" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "scores.json").read_text())["top1_blind_edits"] == 1


# -- malformed records skipped ----------------------------------------------------------------------------------


def test_skipped_knowledge_records_are_counted_in_the_run_stats(tmp_path: Path):
    good = [_record(str(i), f"Nordic {i}", f"Coastal {i}").to_dict() | {"subject": f"Person {i}"} for i in range(4)]
    bad = good[0] | {"case_id": "bad", "subject": ""}
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([*good, bad]), encoding="utf-8")
    edits = ApplyEdits(knowledge=str(path), n_edit=1, n_control=1, known_protocol="none", on_error="skip")
    stats = edits.select(pl_module=None).stats
    assert stats["read_records"] == 4 and stats["skipped_records"] == 1
