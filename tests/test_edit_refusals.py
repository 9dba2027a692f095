"""Edits that did not happen are refused, not recorded: a zero update of ROME, MEMIT or AlphaEdit (the v*/z
optimisation left δ at zero) is an EditError; learning rates and the other v*/z settings must be finite."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from editing_models import FACT, OTHER, edit_model

from retention.arch import ArchAdapter
from retention.editing.alphaedit import AlphaEditEditor, AlphaEditHParams
from retention.editing.base import EditError, run_edits
from retention.editing.memit import MemitEditor, MemitHParams
from retention.editing.rome import RomeEditor, RomeHParams

SMALL = {"context_templates": [[3, 1]], "v_steps": 5, "mom2_adjustment": False}
EDITORS = {
    "rome": lambda **kw: RomeEditor(RomeHParams(layer=0, **SMALL, **kw)),
    "memit": lambda **kw: MemitEditor(MemitHParams(layers=[0, 1], **SMALL, **kw)),
    "alphaedit": lambda **kw: AlphaEditEditor(AlphaEditHParams(layers=[0, 1], **SMALL, **kw)),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", EDITORS)
def test_an_overflowing_v_lr_gives_a_zero_update_that_is_refused(tiny_llama, cache, name, caplog):
    """v_lr 1e30: ‖δ‖ overflows float32 after the first Adam step, the clamp multiplies δ by max/inf = 0, and the
    update is exactly zero; it used to be returned as an edit with |dW| 0."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    weights = {i: ArchAdapter.for_model(model).mlp_out_weight(i) for i in (0, 1)}
    before = {i: w.detach().clone() for i, w in weights.items()}
    with caplog.at_level(logging.WARNING, logger="retention.editing.targets"):
        editor = EDITORS[name](v_lr=1e30)
    assert "v_lr=1e+30 is far above" in caplog.text
    with pytest.raises(EditError, match=r"edit request 1 .*: the .*update.* is zero \(‖ΔW‖ 0, ‖W‖ .*\): the "
                                        r"edit failed and is not applied.*lower v_lr"):
        run_edits(editor, model, tokenizer, [FACT, OTHER], "batch" if name != "rome" else "sequential")
    assert all(torch.equal(weights[i], before[i]) for i in weights)


@pytest.mark.parametrize("name", EDITORS)
def test_a_normal_edit_is_not_refused_as_zero(tiny_llama, cache, name):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    (result,) = run_edits(EDITORS[name](), model, tokenizer, [FACT], "batch")
    assert all(d.norm() > 0 for d in result.deltas.values())


@pytest.mark.parametrize("field", ["v_lr", "clamp_norm_factor", "kl_factor", "v_weight_decay", "early_stop_loss"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_v_settings_must_be_finite(field, value):
    for cls in (RomeHParams, MemitHParams, AlphaEditHParams):
        with pytest.raises(ValueError, match=rf"{field}={value}: must be a finite number"):
            cls(**{field: value})


@pytest.mark.parametrize(("field", "value", "match"), [
    ("v_lr", 0.0, "v_lr=0.0: must be > 0"), ("v_steps", 1, "v_steps=1: must be >= 2"),
    ("kl_factor", -1.0, "kl_factor=-1.0: must be >= 0"), ("clamp_norm_factor", -2.0, "must be > 0"),
])
def test_v_settings_out_of_range_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        RomeHParams(**{field: value})


def test_a_fact_the_model_already_gives_is_no_failed_edit(tiny_llama, cache):
    """δ stays zero when the loss is below early_stop_loss before the first step: nothing to write, no error."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    (result,) = run_edits(EDITORS["rome"](early_stop_loss=1e9), model, tokenizer, [FACT], "batch")
    assert all(d.abs().max() == 0 for d in result.deltas.values())
