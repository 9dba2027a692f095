import random
from pathlib import Path

import pytest
import torch
from conftest import DATA, needs_data
from editing_models import (
    FACT,
    OTHER,
    UNRELATED,
    edit_model,
    kl,
    next_token_logprobs,
    rewrite_probe,
    same_state,
    state,
)
from transformers.pytorch_utils import Conv1D

from bench.reference import naive_targets
from retention import arch
from retention.arch import ArchAdapter
from retention.editing.base import PRESETS, EditError, EditRequest, EditResult, run_edits
from retention.editing.registry import EDITORS, build_editor
from retention.editing.rome import RomeEditor, RomeHParams
from retention.editing.targets import TargetHParams, TargetVector, optimise_targets
from retention.scoring import score_probes

WORDS = ("the of and a in to was is for on as by with he she it from at his her an which that were are city river "
         "king film album song team war music born known years first new after school church played house").split()


@pytest.fixture
def corpus(tmp_path, tiny_llama, monkeypatch) -> Path:
    """A small seeded text file (key statistics only need tokens), and a private cache folder."""
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
                  for _ in range(200)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def _hp(corpus: Path, **kw) -> RomeHParams:
    # Random tiny models have small activations: no weight decay, a loose clamp.
    base = dict(layer=0, context_templates=[[5, 3]], v_weight_decay=0.0, clamp_norm_factor=1e4, mom2_corpus=str(corpus),
                mom2_samples=200, mom2_max_length=32)
    return RomeHParams(**{**base, **kw})


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rome_lands_a_rank_one_local_edit_and_reverts_exactly(tiny_llama, corpus, kind):
    tokenizer = tiny_llama[1]
    model = edit_model(kind, len(tokenizer))
    saved = state(model)
    probe = rewrite_probe(FACT)
    assert not score_probes(model, tokenizer, [probe])[0].passed["top1"]
    lp_rewrite, lp_unrelated = (next_token_logprobs(model, tokenizer, p) for p in (probe.prompt, UNRELATED))

    result = RomeEditor(_hp(corpus)).edit(model, tokenizer, [FACT])
    assert same_state(model, saved)  # edit() computes; it does not leave the weights changed
    (name, delta), = result.deltas.items()
    adapter = ArchAdapter.for_model(model)
    assert name == adapter.mlp_out_name(0) + ".weight" and result.layers == [0]
    assert delta.shape == adapter.mlp_out_weight(0).shape
    s = torch.linalg.svdvals(delta.double())
    assert s[1] < 1e-6 * s[0]  # rank one up to float32 rounding

    result.apply(model)
    assert score_probes(model, tokenizer, [probe])[0].passed["top1"]
    moved = kl(lp_rewrite, next_token_logprobs(model, tokenizer, probe.prompt))
    unrelated = kl(lp_unrelated, next_token_logprobs(model, tokenizer, UNRELATED))
    assert unrelated < 0.1 * moved, (unrelated, moved)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(saved[k], v)]
    assert changed == [name]
    result.revert(model)
    assert same_state(model, saved)

    diag = result.diagnostics[0]
    assert diag.case_id == FACT.case_id and diag.losses and diag.values["target_prob"] > 0.1


def _linear_copy(model):
    """The GPT-2 model with every MLP output Conv1D ([in, out]) replaced by an equal nn.Linear ([out, in])."""
    import copy

    twin = copy.deepcopy(model)
    for block in twin.transformer.h:
        conv = block.mlp.c_proj
        lin = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            lin.bias.copy_(conv.bias)
        block.mlp.c_proj = lin
    return twin


def test_conv1d_and_linear_give_the_same_edit(tiny_llama, corpus, monkeypatch):
    tokenizer = tiny_llama[1]
    conv_model = edit_model("gpt2", len(tokenizer))
    assert isinstance(conv_model.transformer.h[0].mlp.c_proj, Conv1D)
    lin_model = _linear_copy(conv_model)
    hp = _hp(corpus)
    conv = RomeEditor(hp).edit(conv_model, tokenizer, [FACT])
    layout = arch._LAYOUTS["gpt2"]
    monkeypatch.setitem(arch._LAYOUTS, "gpt2", arch._Layout(**{**layout.__dict__, "weight_is_in_out": False}))
    lin = RomeEditor(hp).edit(lin_model, tokenizer, [FACT])
    (name, d_conv), = conv.deltas.items()
    d_lin = lin.deltas[name]
    assert d_conv.shape == d_lin.t().shape
    assert torch.allclose(d_conv, d_lin.t(), rtol=1e-3, atol=1e-5 * d_lin.abs().max().item())
    conv.apply(conv_model)
    lin.apply(lin_model)
    ids = tokenizer([FACT.rewrite_prompt, UNRELATED], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(conv_model(**ids).logits, lin_model(**ids).logits, atol=1e-4)


def test_modes_sequential_batch_single(tiny_llama, corpus):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    saved = state(model)
    editor = RomeEditor(_hp(corpus))
    probes = [rewrite_probe(FACT), rewrite_probe(OTHER)]

    single = run_edits(editor, model, tokenizer, [FACT, OTHER], "single")
    assert len(single) == 2 and same_state(model, saved)
    for result, probe in zip(single, probes):
        result.apply(model)
        assert score_probes(model, tokenizer, [probe])[0].passed["top1"]
        result.revert(model)

    sequential = run_edits(editor, model, tokenizer, [FACT, OTHER], "sequential")
    assert [r.case_ids for r in sequential] == [["1"], ["2"]]
    assert all(r.passed["top1"] for r in score_probes(model, tokenizer, probes))
    for result in reversed(sequential):
        result.revert(model)
    assert same_state(model, saved)

    (batch,) = run_edits(editor, model, tokenizer, [FACT, OTHER], "batch")
    assert batch.case_ids == ["1", "2"] and len(batch.diagnostics) == 2
    assert all(r.passed["top1"] for r in score_probes(model, tokenizer, probes))
    batch.revert(model)
    assert same_state(model, saved)
    with pytest.raises(ValueError, match="mode="):
        run_edits(editor, model, tokenizer, [FACT], "parallel")


def _targets(model, tokenizer, requests, optimise=optimise_targets):
    hp = TargetHParams(v_steps=8, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=1e4, early_stop_loss=0.0)
    return optimise(model, tokenizer, requests, ["{}", "Hello there. {}"], hp, 0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_targets_equal_one_at_a_time(tiny_llama, kind):
    tokenizer = tiny_llama[1]
    model = edit_model(kind, len(tokenizer))
    augmented = EditRequest("3", "Toko Yasuda", "{} plays the", "piano", "guitar", ("The music of {} uses the",))
    requests = [FACT, OTHER, augmented]
    batched = _targets(model, tokenizer, requests)
    for req, vec in zip(requests, batched):
        (alone,) = _targets(model, tokenizer, [req])
        assert torch.allclose(vec.init, alone.init, atol=1e-6)
        assert torch.allclose(vec.delta, alone.delta, atol=1e-4 * alone.delta.norm().item())
        assert vec.steps == alone.steps == 7
        assert vec.losses == pytest.approx(alone.losses, rel=1e-4)


def test_cached_prefix_targets_equal_naive_loop(tiny_llama):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    fast, slow = _targets(model, tokenizer, [FACT]), _targets(model, tokenizer, [FACT], naive_targets)
    assert torch.allclose(fast[0].delta, slow[0].delta, atol=1e-5 * slow[0].delta.norm().item())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # flags restored, no stray grads


def test_early_stop_is_per_fact(tiny_llama):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    hp = TargetHParams(v_steps=10, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=1e4, early_stop_loss=1e9)
    vecs = optimise_targets(model, tokenizer, [FACT, OTHER], ["{}"], hp, 0)
    assert [v.steps for v in vecs] == [0, 0] and all(v.delta.abs().max() == 0 for v in vecs)


def test_clamp_bounds_delta(tiny_llama):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    hp = TargetHParams(v_steps=5, v_lr=1.0, v_weight_decay=0.0, clamp_norm_factor=0.5, early_stop_loss=0.0)
    (vec,) = optimise_targets(model, tokenizer, [FACT], ["{}"], hp, 0)
    assert vec.delta.norm() <= 0.5 * vec.init.norm() * (1 + 1e-5)


def test_non_finite_update_names_the_request(tiny_llama, corpus, monkeypatch):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    saved = state(model)

    def broken(model, tokenizer, requests, templates, hparams, layer, site):
        return [TargetVector(torch.full((64,), float("nan")), torch.ones(64), key=torch.ones(64, dtype=torch.float64))
                for _ in requests]

    monkeypatch.setattr("retention.editing.rome.optimise_targets", broken)
    with pytest.raises(EditError, match="edit request 1 .*non-finite v\\* delta"):
        RomeEditor(_hp(corpus, mom2_adjustment=False)).edit(model, tokenizer, [FACT])
    assert same_state(model, saved)


def test_edit_result_save_load_apply_revert(tiny_llama, corpus, tmp_path):
    tokenizer = tiny_llama[1]
    model = edit_model("gpt2", len(tokenizer))
    saved = state(model)
    result = RomeEditor(_hp(corpus, mom2_adjustment=False)).edit(model, tokenizer, [FACT])
    loaded = EditResult.load(result.save(tmp_path / "edit"))
    assert loaded.case_ids == ["1"] and loaded.layers == [0] and loaded.hparams["layer"] == 0
    assert loaded.diagnostics[0].losses == result.diagnostics[0].losses
    assert all(torch.equal(loaded.deltas[k], v) for k, v in result.deltas.items())
    loaded.apply(model)
    with pytest.raises(EditError, match="already applied"):
        loaded.apply(model)
    loaded.revert(model)
    assert same_state(model, saved)
    with pytest.raises(EditError, match="not applied"):
        loaded.revert(model)
    with pytest.raises(FileNotFoundError, match="edit.json"):
        EditResult.load(tmp_path)
    wrong = EditResult("rome", {"transformer.h.0.mlp.c_proj.weight": torch.zeros(3, 3)}, [0], ["1"])
    with pytest.raises(EditError, match="shape"):
        wrong.apply(model)


def test_apply_in_half_precision_reverts_bit_for_bit(tiny_llama, corpus):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer)).to(torch.bfloat16)
    saved = state(model)
    result = RomeEditor(_hp(corpus, mom2_adjustment=False, v_steps=3)).edit(model, tokenizer, [FACT])
    assert all(d.dtype == torch.float32 for d in result.deltas.values())
    result.apply(model)
    assert not same_state(model, saved)
    result.revert(model)
    assert same_state(model, saved)


def test_hparams_yaml_presets_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the large presets' hub corpus: no network check in tests
    (tmp_path / "data" / "wikitext").mkdir(parents=True)  # the SmolLM2 preset's wikitext2, wherever this runs
    (tmp_path / "data" / "wikitext" / "wiki.test.raw").write_text("text", encoding="utf-8")
    monkeypatch.setenv("RETENTION_DATA", str(tmp_path / "data"))
    path = tmp_path / "h.yaml"
    path.write_text("layer: 3\nv_lr: 5e-1\nkl_prompts: ['{} is a']\nbogus: 1\n")
    with pytest.raises(ValueError, match=f"{path}: unknown RomeHParams field.*bogus"):
        RomeHParams.from_yaml(path)
    path.write_text("layer: 3\nv_lr: 5e-1\n")
    hp = RomeHParams.from_yaml(path)
    assert hp.layer == 3 and hp.v_lr == 0.5
    path.write_text("layer: three\n")
    with pytest.raises(ValueError, match="layer='three'"):
        RomeHParams.from_yaml(path)
    with pytest.raises(ValueError, match="site|clamp_norm_factor"):
        RomeHParams(clamp_norm_factor=0)
    for name, (cls, _) in EDITORS.items():
        presets = sorted((PRESETS / name).glob("*.yaml"))
        assert presets, f"no presets for {name}"
        for preset in presets:
            cls.hparams_class.from_yaml(preset)
    assert build_editor("rome", model_name="HuggingFaceTB/SmolLM2-135M").hparams == \
        RomeHParams.from_yaml(PRESETS / "rome" / "smollm2-135m.yaml")
    assert build_editor("rome", "gpt2-xl").hparams.layer == 17
    assert build_editor("ft-l", model_name="smollm2-135m").hparams.variant == "ft-l"
    with pytest.raises(FileNotFoundError, match="no preset 'nope'"):
        build_editor("rome", model_name="org/nope")
    with pytest.raises(ValueError, match="unknown editor"):
        build_editor("memorize")


@pytest.mark.slow
@needs_data
def test_rome_on_the_default_model(real_model, tmp_path, monkeypatch):
    """Three known CounterFact facts, sequential ROME with the preset (smaller key statistics for time)."""
    from retention.data.readers import load_records
    from retention.data.selection import select_known_facts

    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path))
    model, tokenizer = real_model
    records = load_records(DATA / "counterfact" / "counterfact_preknown.json", limit=12)
    known = select_known_facts(model, tokenizer, records)[:3]
    saved = state(model)
    editor = build_editor("rome", model_name="smollm2-135m", mom2_samples=100)
    results = run_edits(editor, model, tokenizer, [EditRequest.from_record(r) for r in known], "sequential")
    try:
        scored = score_probes(model, tokenizer, [p for r in known for p in r.edit_probes()])
    finally:
        for r in reversed(results):
            r.revert(model)
    assert same_state(model, saved)
    rewrite = [s for s in scored if s.probe.kind == "rewrite"]
    neighbours = [s for s in scored if s.probe.kind == "neighborhood"]
    assert sum(s.passed["prob"] for s in rewrite) == 3
    assert sum(s.passed["prob"] for s in neighbours) >= 0.7 * len(neighbours)


@pytest.mark.parametrize("layer", [7, -3])
def test_a_layer_outside_the_model_is_an_error_not_a_wrapped_index(tiny_llama, corpus, layer):
    """A preset for a deeper model (layer 7 on 2 layers) used to edit layer 7 % 2 = 1 while recording 7."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    saved = state(model)
    for mom2 in (False, True):
        with pytest.raises(ValueError, match=f"layers: {layer} is out of range for a model with 2 layers"):
            RomeEditor(_hp(corpus, mom2_adjustment=mom2, layer=layer)).edit(model, tokenizer, [FACT])
    assert same_state(model, saved)
