"""ApplyEdits' pieces on their own: the selection step and its cache, the edit made here and its cache, and the
options as `retention fit` parses them (flat keys under `edits`, help from the groups' attribute docstrings)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from editing_models import edit_model
from jsonargparse import ArgumentParser, set_parsing_settings
from tiny_runs import ROME

from retention.callbacks.apply_edits import ApplyEdits, EditsArgs
from retention.callbacks.edit_selection import FactSelectionArgs, known_facts, select_facts
from retention.callbacks.edit_source import EditHere, EditingArgs
from retention.data.readers import load_records
from retention.models import model_fingerprint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama):
    return edit_model("llama", len(tiny_llama[1])), tiny_llama[1]


def test_known_facts_come_back_from_the_selection_cache(cache, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    records = load_records("builtin")[:24]
    fingerprint = model_fingerprint(model)
    scored, hit = known_facts(model, tokenizer, records, "prob", fingerprint, cache=True)
    again, hit_again = known_facts(model, tokenizer, records, "prob", fingerprint, cache=True)
    assert (hit, hit_again) == (False, True) and again == scored and 0 < len(scored) < len(records)
    assert known_facts(model, tokenizer, records[:12], "prob", fingerprint, cache=True)[1] is False
    assert known_facts(model, tokenizer, records, "prob", fingerprint, cache=False)[1] is False


def test_selection_with_an_edit_set_draws_only_controls():
    records = load_records("builtin")
    args = FactSelectionArgs(n_control=4, known_protocol="none", seed=2)
    edit_set = records[:3]
    selection = select_facts(args, None, None, candidates="builtin", edit_set=edit_set)
    assert selection.sets.edit == edit_set and len(selection.sets.control) == 4
    assert not {str(r.case_id) for r in edit_set} & {str(r.case_id) for r in selection.sets.control}
    assert selection.cache_hit is None and selection.stats["known"] == len(records)
    alone = select_facts(FactSelectionArgs(known_protocol="none"), None, None, candidates=None, edit_set=edit_set)
    assert alone.sets.edit == edit_set and alone.sets.control == [] and alone.stats["candidates"] == 0


def test_an_edit_made_here_is_reused_from_the_edit_cache_bit_for_bit(cache, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    records = load_records("builtin")[:2]
    source = EditHere(EditingArgs(editor="rome", hparams=dict(ROME)), cache=True)
    outcomes, weights = [], []
    for _ in range(2):
        model = edit_model("llama", len(tokenizer))
        pl_module = SimpleNamespace(model=model, tokenizer=tokenizer)
        outcomes.append(source.apply(pl_module, records, model_fingerprint(model)))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    made, reused = outcomes
    assert (made.cache_hit, reused.cache_hit) == (False, True)
    assert made.layers == reused.layers == [0] and made.parameters == reused.parameters
    assert made.diagnostics == reused.diagnostics and made.hparams == reused.hparams
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    assert not torch.equal(weights[0][made.parameters[0]], edit_model("llama", len(tokenizer)).get_parameter(
        made.parameters[0]))


def test_fit_parses_the_flat_edits_keys_with_the_groups_help():
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser()
    parser.add_class_arguments(ApplyEdits, "edits")
    assert set(parser.get_defaults().as_dict()["edits"]) == set(EditsArgs.__dataclass_fields__)
    help_text = " ".join(parser.format_help().split())
    assert "Seed of the sample and of the edit/control split." in help_text
    assert "With ``mode: single``, which of the ``n_edit`` selected facts this run edits." in help_text
    config = parser.parse_args(["--edits.n_edit", "2", "--edits.known_protocol", "none", "--edits.mode", "single",
                                "--edits.single_index", "1"])
    edits = parser.instantiate_classes(config).edits
    assert isinstance(edits, ApplyEdits) and edits.args == EditsArgs(n_edit=2, known_protocol="none", mode="single",
                                                                     single_index=1)


def test_a_memory_edit_is_made_every_time_never_taken_from_the_weight_cache(cache, model_and_tokenizer):
    """GRACE changes no weight: the edit cache (edited weights) would give an unedited model back."""
    _, tokenizer = model_and_tokenizer
    records = load_records("builtin")[:2]
    source = EditHere(EditingArgs(editor="grace", hparams=dict(layer=0, radius=1.0, value_lr=0.5, value_steps=20)),
                      cache=True)
    for _ in range(2):
        model = edit_model("llama", len(tokenizer))
        applied = source.apply(SimpleNamespace(model=model, tokenizer=tokenizer), records, model_fingerprint(model))
        assert not applied.cache_hit
        assert any(type(m).__name__ == "GraceMemory" for m in model.modules())


def test_the_hyperparameters_resolve_once_for_the_option_check_and_the_edit(cache, model_and_tokenizer, monkeypatch):
    import retention.callbacks.edit_source as edit_source

    _, tokenizer = model_and_tokenizer
    resolved = []
    real = edit_source.editor_hparams
    monkeypatch.setattr(edit_source, "editor_hparams", lambda *args: resolved.append(args) or real(*args))
    source = EditHere(EditingArgs(editor="rome", hparams=dict(ROME)), cache=False)
    assert source.layers(None) == [0]  # the check before the run (a pl_module without model_name: None)
    model = edit_model("llama", len(tokenizer))
    source.apply(SimpleNamespace(model=model, tokenizer=tokenizer), load_records("builtin")[:1], model_fingerprint(model))
    assert len(resolved) == 1
