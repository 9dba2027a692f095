from pathlib import Path

import pytest
import torch
from conftest import DATA, needs_data
from editing_models import edit_model, same_state, state
from memit_cases import REQUESTS, tiny_hparams, top1, write_corpus

from retention.arch import ArchAdapter
from retention.editing import causal_trace
from retention.editing.base import PRESETS, EditRequest, run_edits
from retention.editing.memit import MemitEditor, MemitHParams, keys_and_values, memit_delta
from retention.editing.registry import build_editor
from retention.editing.target_rows import PromptRow, plan_chunks
from retention.editing.targets import TargetHParams, optimise_targets


@pytest.fixture
def corpus(tmp_path, tiny_llama, monkeypatch) -> Path:
    """The key-statistics corpus and a private cache folder (set after the tiny models are loaded: they use the
    default tokenizer from the shared cache)."""
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_batch_of_16_edits_all_land_and_revert_exactly(tiny_llama, corpus, kind):
    tokenizer = tiny_llama[1]
    model = edit_model(kind, len(tokenizer))
    saved = state(model)
    assert not any(top1(model, tokenizer, REQUESTS))
    result = MemitEditor(MemitHParams(**tiny_hparams(corpus, mom2_update_weight=10.0))).edit(model, tokenizer, REQUESTS)
    assert same_state(model, saved)
    adapter = ArchAdapter.for_model(model)
    assert sorted(result.deltas) == sorted(f"{adapter.mlp_out_name(i)}.weight" for i in (0, 1))
    assert result.layers == [0, 1] and result.case_ids == [r.case_id for r in REQUESTS]
    assert len(result.diagnostics) == 16 and all(d.losses for d in result.diagnostics)
    result.apply(model)
    assert all(top1(model, tokenizer, REQUESTS))
    result.revert(model)
    assert same_state(model, saved)


def test_memit_delta_writes_the_residuals_when_the_covariance_weight_vanishes():
    torch.manual_seed(0)
    keys, resid = torch.randn(5, 12), torch.randn(5, 7)
    delta = memit_delta(keys, resid, None, 1e-9)
    assert delta.shape == (7, 12) and delta.dtype == torch.float64
    torch.testing.assert_close(keys.double() @ delta.T, resid.double(), atol=1e-6, rtol=1e-6)
    # A large λ keeps the update small in the directions the covariance weighs.
    assert memit_delta(keys, resid, torch.eye(12), 1e4).norm() < 0.01 * delta.norm()


def test_augmentations_add_key_value_columns_of_the_same_fact(tiny_llama):
    model, tokenizer = tiny_llama
    plain = REQUESTS[0]
    augmented = EditRequest(plain.case_id, plain.subject, plain.prompt, plain.target_new,
                            augmentations=("{} was raised speaking", "{}'s first language is"))
    keys, values = keys_and_values(model, tokenizer, [augmented, REQUESTS[1]], ["{}", "Hello. {}"], 0, 1)
    assert keys.shape == (4, 128) and values.shape == (4, 64)
    alone, alone_values = keys_and_values(model, tokenizer, [plain], ["{}", "Hello. {}"], 0, 1)
    torch.testing.assert_close(keys[0], alone[0])
    torch.testing.assert_close(values[0], alone_values[0])
    assert not torch.allclose(keys[0], keys[1])


def test_augmented_requests_edit_through_the_registry(tiny_llama, corpus):
    tokenizer = tiny_llama[1]
    model = edit_model("gpt2", len(tokenizer))
    req = EditRequest("a", "Danielle Darrieux", "The mother tongue of {}", "English",
                      augmentations=("{} was raised speaking",))
    editor = build_editor("memit", tiny_hparams(corpus, mom2_update_weight=10.0))
    assert isinstance(editor, MemitEditor)
    result = editor.edit(model, tokenizer, [req])
    result.apply(model)
    assert all(top1(model, tokenizer, [req]))


def test_located_layers_and_sequential_mode(tiny_llama, corpus, monkeypatch, tmp_path):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    monkeypatch.setattr(causal_trace, "cache_dir", lambda: tmp_path / "located")
    hp = MemitHParams.from_dict(tiny_hparams(corpus, layers="located", mom2_update_weight=10.0))
    with pytest.raises(causal_trace.LayersNotLocated, match="retention locate"):
        MemitEditor(hp).edit(model, tokenizer, REQUESTS[:1])
    causal_trace.save_located(model, [0, 1])
    results = run_edits(MemitEditor(hp), model, tokenizer, REQUESTS[:4], mode="sequential", batch_size=2)
    assert [r.layers for r in results] == [[0, 1], [0, 1]]
    assert all(top1(model, tokenizer, REQUESTS[2:4]))  # the last batch, computed on the model holding the first


def test_hparams_errors_and_presets(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the large presets' hub corpus: no network check in tests
    with pytest.raises(ValueError, match="layers='best'"):
        MemitHParams(layers="best")
    with pytest.raises(ValueError, match="layers"):
        MemitHParams(layers=[])
    assert MemitHParams.from_dict({"layers": "located"}).layers == "located"
    assert MemitHParams.from_dict({"layers": [4, 5]}).layers == [4, 5]
    for preset in sorted((PRESETS / "memit").glob("*.yaml")):
        MemitHParams.from_yaml(preset)
    assert {"smollm2-135m", "gpt2-xl", "gpt-j-6b", "llama-3-8b"} <= {p.stem for p in (PRESETS / "memit").glob("*.yaml")}


def test_target_optimisation_in_chunks_gives_the_same_vectors(tiny_llama):
    """A step over many facts runs in chunks of rows (bounded memory); the vectors do not change."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    hp = TargetHParams(v_steps=4, v_weight_decay=0.0, clamp_norm_factor=1e4)
    templates = ["{}", "A b c. {}"]
    whole = optimise_targets(model, tokenizer, REQUESTS[:6], templates, hp, 1, "layer", max_rows=1000)
    chunked = optimise_targets(model, tokenizer, REQUESTS[:6], templates, hp, 1, "layer", max_rows=5)
    for a, b in zip(whole, chunked):
        # Equal up to float noise: the padded widths of the forwards differ.
        assert ((a.delta - b.delta).norm() / b.delta.norm()).item() < 1e-5
        assert a.losses == pytest.approx(b.losses, rel=1e-5)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("editor", ["memit", "alphaedit"])
def test_batch_editors_on_the_default_model(real_model, tmp_path, monkeypatch, editor):
    """Four known CounterFact facts in one batch with the SmolLM2 preset (smaller key statistics for time): every
    edit lands under `prob`, most neighbours keep their answer, and revert restores the model bit for bit."""
    from retention.data.readers import load_records
    from retention.data.selection import select_known_facts
    from retention.scoring import score_probes

    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path))
    model, tokenizer = real_model
    known = select_known_facts(model, tokenizer, load_records(DATA / "counterfact" / "counterfact_preknown.json",
                                                              limit=16))[:4]
    saved = state(model)
    requests = [EditRequest.from_record(r) for r in known]
    (result,) = run_edits(build_editor(editor, model_name="smollm2-135m", mom2_samples=100), model, tokenizer,
                          requests, "batch")
    try:
        scored = score_probes(model, tokenizer, [p for r in known for p in r.edit_probes()])
    finally:
        result.revert(model)
    assert same_state(model, saved)
    assert result.layers == [3, 4, 5, 6, 7]
    rewrite = [s for s in scored if s.probe.kind == "rewrite"]
    neighbours = [s for s in scored if s.probe.kind == "neighborhood"]
    assert sum(s.passed["prob"] for s in rewrite) == 4
    assert sum(s.passed["prob"] for s in neighbours) >= 0.7 * len(neighbours)
    if editor == "alphaedit":
        assert all(0 < r < 1536 for r in result.hparams["projector_ranks"].values())


def test_target_rows_are_chunked_by_length():
    """Every row of the wanted facts runs exactly once, at most ``max_rows`` per chunk, short rows apart from long."""
    lengths = [3, 20, 4, 21, 5, 22, 3, 20]
    rows = [PromptRow(f // 2, [0] * n, 0, [1], 1.0) for f, n in enumerate(lengths)]
    groups = plan_chunks(rows, range(4), max_rows=4)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(0 < len(g) <= 4 for g in groups)
    assert all(len({lengths[i] < 10 for i in g}) == 1 for g in groups)
    assert plan_chunks(rows, [1], max_rows=3) == [[2, 3]]
