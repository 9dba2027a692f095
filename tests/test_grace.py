import dataclasses

import pytest
import torch
from conftest import DATA, needs_data
from editing_models import (
    FACT,
    OTHER,
    UNRELATED,
    edit_model,
    next_token_logprobs,
    same_state,
    state,
)
from memory_cases import fine_tune, passes, single_edits_of_known_facts

from retention.arch import ArchAdapter
from retention.editing.base import EditError, run_edits
from retention.editing.grace import REACH_MARGIN, GraceEditor, GraceHParams
from retention.editing.memory import ATTRIBUTE, MEMORY_FILE, MemoryEditResult, attached, load_edit_result
from retention.editing.registry import build_editor
from retention.editing.trace import capture


def _hp(**kw) -> GraceHParams:
    return GraceHParams(**{**dict(layer=0, radius=1.0, value_lr=0.5, value_steps=60), **kw})


def _keys(model, tokenizer, prompt: str) -> torch.Tensor:
    """The projection's input at every position of ``prompt``."""
    module = ArchAdapter.for_model(model).mlp_out(0)
    with capture({"f": module}, outputs=False) as seen:
        next_token_logprobs(model, tokenizer, prompt)
    return seen["f"].input[0].float()



@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_grace_lands_defers_outside_the_radius_bit_for_bit_and_reverts_exactly(tiny_llama, kind):
    tokenizer = tiny_llama[1]
    model = edit_model(kind, len(tokenizer))
    saved = state(model)
    assert not passes(model, tokenizer, FACT)
    unrelated = next_token_logprobs(model, tokenizer, UNRELATED)
    rewrite = next_token_logprobs(model, tokenizer, FACT.rewrite_prompt)

    result = GraceEditor(_hp()).edit(model, tokenizer, [FACT])
    assert isinstance(result, MemoryEditResult) and result.deltas == {} and result.layers == [0]
    module = ArchAdapter.for_model(model).mlp_out(0)
    assert same_state(model, saved) and attached(module) is None  # edit() computes; the model is as it was
    (key,) = result.memory.tensors["keys"]
    assert torch.equal(key, _keys(model, tokenizer, FACT.rewrite_prompt)[-1])  # the prompt's last token
    # The defining property is only tested if no position of the unrelated prompt falls within the radius.
    assert torch.cdist(_keys(model, tokenizer, UNRELATED), key[None]).min() > result.memory.tensors["radii"][0]

    result.apply(model)
    assert passes(model, tokenizer, FACT)
    assert torch.equal(next_token_logprobs(model, tokenizer, UNRELATED), unrelated)
    assert list(model.state_dict()) == list(saved) and same_state(model, saved)  # nothing in the weights
    assert not [n for n, _ in model.named_parameters() if ATTRIBUTE in n]
    result.revert(model)
    assert attached(module) is None and not module._forward_hooks
    assert torch.equal(next_token_logprobs(model, tokenizer, FACT.rewrite_prompt), rewrite)
    with pytest.raises(EditError, match="not applied"):
        result.revert(model)


def test_a_conflicting_key_splits_the_radius_and_a_matching_label_expands_it(tiny_llama):
    """GRACE's codebook rules: with a radius covering everything, a second edit with another label shrinks both
    balls to half the keys' distance (both edits then land), and one with the same label joins the first key."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    editor = GraceEditor(_hp(radius=1e6))
    first = editor.edit(model, tokenizer, [FACT])
    first.apply(model)
    try:
        split = editor.edit(model, tokenizer, [OTHER])
        same_label = editor.edit(model, tokenizer, [dataclasses.replace(OTHER, case_id="3", target_new=FACT.target_new)])
    finally:
        first.revert(model)
    keys, radii = split.memory.tensors["keys"], split.memory.tensors["radii"]
    distance = torch.dist(keys[0], keys[1]).item()
    assert split.diagnostics[0].values["rule"] == "split"
    assert torch.allclose(radii, torch.full((2,), distance / 2))
    assert split.memory.meta["labels"] == [FACT.target_new, OTHER.target_new]
    split.apply(model)
    assert passes(model, tokenizer, FACT) and passes(model, tokenizer, OTHER)
    split.revert(model)

    assert same_label.diagnostics[0].values["rule"] == "expand"
    assert same_label.memory.tensors["keys"].shape[0] == 1 and same_label.memory.tensors["radii"][0] == 1e6
    assert same_label.memory.case_ids == [FACT.case_id, "3"]


def test_sequential_grace_extends_one_codebook_and_merges_and_saves_without_pickle(tiny_llama, tmp_path):
    tokenizer = tiny_llama[1]
    model = edit_model("gpt2", len(tokenizer))
    saved = state(model)
    results = run_edits(GraceEditor(_hp()), model, tokenizer, [FACT, OTHER], "sequential")
    assert [r.memory.case_ids for r in results] == [["1"], ["1", "2"]]
    assert passes(model, tokenizer, FACT) and passes(model, tokenizer, OTHER)
    edited = next_token_logprobs(model, tokenizer, OTHER.rewrite_prompt)
    results[1].revert(model)
    assert attached(ArchAdapter.for_model(model).mlp_out(0)) is results[0]._installed  # the first call's codebook
    results[0].revert(model)
    assert same_state(model, saved) and attached(ArchAdapter.for_model(model).mlp_out(0)) is None

    merged = MemoryEditResult.merge(results)
    folder = merged.save(tmp_path / "edit")
    assert sorted(p.name for p in folder.iterdir()) == ["edit.json", MEMORY_FILE]
    loaded = load_edit_result(folder)
    assert isinstance(loaded, MemoryEditResult) and loaded.case_ids == ["1", "2"]
    loaded.apply(model)
    assert torch.equal(next_token_logprobs(model, tokenizer, OTHER.rewrite_prompt), edited)
    loaded.revert(model)

    singles = run_edits(GraceEditor(_hp()), model, tokenizer, [FACT, OTHER], "single")
    with pytest.raises(EditError, match="independent results cannot"):
        MemoryEditResult.merge(singles)


def test_fine_tuning_under_a_codebook_trains_the_base_and_leaves_the_codebook(tiny_llama):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    result = GraceEditor(_hp()).edit(model, tokenizer, [FACT])
    result.apply(model)
    memory = result._installed
    book = {k: v.clone() for k, v in memory.tensors().items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fine_tune(model, tokenizer, FACT)
    assert all(torch.equal(book[k], v) for k, v in memory.tensors().items())
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert ArchAdapter.for_model(model).mlp_out_name(0) + ".weight" in moved
    result.revert(model)


def test_the_smollm2_preset_resolves(tiny_llama):
    editor = build_editor("grace", model_name="smollm2-135m")
    assert isinstance(editor, GraceEditor) and editor.hparams.layer == 20
    with pytest.raises(ValueError, match="radius"):
        GraceHParams(radius=0)


@pytest.mark.slow
@needs_data
def test_grace_on_the_default_model(real_model):
    """Three known CounterFact facts, each edited alone with the preset: the edit lands, neighbours keep their
    answers as often as unedited."""
    rewrites, kept = single_edits_of_known_facts(real_model, "grace", 3, str(DATA / "counterfact" / "counterfact_preknown.json"))
    assert all(rewrites) and len(rewrites) == 3
    assert sum(kept) >= 0.9 * len(kept)


def test_an_expanded_ball_covers_the_phrasing_it_grew_for_despite_float_noise(tiny_llama):
    """A same-label key just beyond the nearest ball but within its reach grows that ball past the distance (a
    ball of exactly that distance can miss the phrasing in the value's own forward), and the edit lands."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    same = dataclasses.replace(OTHER, case_id="3", target_new=FACT.target_new)
    wide = GraceEditor(_hp(radius=1e6)).edit(model, tokenizer, [FACT])
    wide.apply(model)
    try:
        distance = torch.dist(*GraceEditor(_hp(radius=1e6)).edit(model, tokenizer, [OTHER]).memory.tensors["keys"])
    finally:
        wide.revert(model)
    editor = GraceEditor(_hp(radius=0.75 * distance.item()))
    first = editor.edit(model, tokenizer, [FACT])
    first.apply(model)
    try:
        grown = editor.edit(model, tokenizer, [same])
    finally:
        first.revert(model)
    assert grown.diagnostics[0].values["rule"] == "expand"
    radius = grown.memory.tensors["radii"][0].item()
    assert distance.item() < radius <= distance.item() * (1 + REACH_MARGIN) + 1e-6
    grown.apply(model)
    assert passes(model, tokenizer, FACT) and passes(model, tokenizer, same)
    grown.revert(model)
