import pytest
import torch
import torch.nn.functional as F
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
from retention.editing.base import run_edits
from retention.editing.memory import MEMORY_FILE, MemoryEditResult, attached, load_edit_result
from retention.editing.registry import build_editor
from retention.editing.trace import capture
from retention.editing.wise import WiseEditor, WiseHParams


def _hp(**kw) -> WiseHParams:
    return WiseHParams(**{**dict(layer=0, lr=1.0, steps=40), **kw})


def _acts(model, tokenizer, memory_weight: torch.Tensor, main: torch.Tensor, prompt: str) -> torch.Tensor:
    """Δ(x) = ‖x (W′ − W)ᵀ‖ at every position of ``prompt``."""
    module = ArchAdapter.for_model(model).mlp_out(0)
    with capture({"f": module}, outputs=False) as seen:
        next_token_logprobs(model, tokenizer, prompt)
    return torch.linalg.vector_norm(F.linear(seen["f"].input[0].float(), memory_weight - main), dim=-1)



@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_wise_routes_the_edit_to_the_side_memory_and_everything_else_to_the_main_one(tiny_llama, kind):
    tokenizer = tiny_llama[1]
    model = edit_model(kind, len(tokenizer))
    saved = state(model)
    adapter = ArchAdapter.for_model(model)
    main = adapter.weight_to_out_in(adapter.mlp_out_weight(0)).detach().float()
    assert not passes(model, tokenizer, FACT)
    unrelated = next_token_logprobs(model, tokenizer, UNRELATED)

    result = WiseEditor(_hp()).edit(model, tokenizer, [FACT])
    assert isinstance(result, MemoryEditResult) and result.deltas == {} and same_state(model, saved)
    side, threshold = result.memory.tensors["weight"], result.memory.meta["threshold"]
    # Only the masked entries (about mask_ratio of them) of the side memory moved.
    assert 0 < (side != main).float().mean().item() <= 0.25
    # The router: the edit's routed positions (the subject's last token on) lie above ε, the unrelated prompt's
    # every position below it — so the unrelated prompt's output must be the main memory's, bit for bit.
    acts = _acts(model, tokenizer, side, main, FACT.rewrite_prompt)
    assert acts[-1] * result.hparams["act_ratio"] >= threshold * (1 - 1e-5)
    assert _acts(model, tokenizer, side, main, UNRELATED).max() < threshold

    result.apply(model)
    assert passes(model, tokenizer, FACT)
    assert torch.equal(next_token_logprobs(model, tokenizer, UNRELATED), unrelated)
    assert list(model.state_dict()) == list(saved) and same_state(model, saved)
    result.revert(model)
    assert attached(adapter.mlp_out(0)) is None and not adapter.mlp_out(0)._forward_hooks
    assert same_state(model, saved) and not passes(model, tokenizer, FACT)


def test_sequential_wise_edits_one_side_memory_and_round_trips_through_disk(tiny_llama, tmp_path):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    saved = state(model)
    # In one side memory a later edit can overwrite an earlier one (the paper shards memories against that): a
    # wider mask and smaller margins keep both on the tiny model.
    editor = WiseEditor(_hp(mask_ratio=0.5, act_margins=[1.0, 4.0, 2.0]))
    results = run_edits(editor, model, tokenizer, [FACT, OTHER], "sequential")
    assert [r.memory.case_ids for r in results] == [["1"], ["1", "2"]]
    assert len(results[1].memory.meta["routes"]) == 2  # the threshold covers both edits
    assert passes(model, tokenizer, FACT) and passes(model, tokenizer, OTHER)
    edited = next_token_logprobs(model, tokenizer, FACT.rewrite_prompt)
    for r in reversed(results):
        r.revert(model)
    assert same_state(model, saved) and attached(ArchAdapter.for_model(model).mlp_out(0)) is None

    folder = MemoryEditResult.merge(results).save(tmp_path / "edit")
    assert sorted(p.name for p in folder.iterdir()) == ["edit.json", MEMORY_FILE]
    loaded = load_edit_result(folder)
    loaded.apply(model)
    assert torch.equal(next_token_logprobs(model, tokenizer, FACT.rewrite_prompt), edited)
    loaded.revert(model)


def test_fine_tuning_under_a_side_memory_trains_the_main_memory_only(tiny_llama):
    """The side memory is fixed while the base trains; a routed token's output is W′x + b whatever W becomes."""
    tokenizer = tiny_llama[1]
    model = edit_model("gpt2", len(tokenizer))
    result = WiseEditor(_hp()).edit(model, tokenizer, [FACT])
    result.apply(model)
    memory = result._installed
    side = memory.weight.clone()
    weight = ArchAdapter.for_model(model).mlp_out_weight(0)
    before = weight.detach().clone()
    fine_tune(model, tokenizer, FACT)
    assert torch.equal(memory.weight, side) and not torch.equal(weight, before)
    assert not any(p is memory.weight for p in model.parameters())
    result.revert(model)


def test_the_smollm2_preset_resolves():
    editor = build_editor("wise", model_name="smollm2-135m")
    assert isinstance(editor, WiseEditor) and editor.hparams.layer == 20
    with pytest.raises(ValueError, match="act_margins"):
        WiseHParams(act_margins=[1.0, 2.0])


@pytest.mark.slow
@needs_data
def test_wise_on_the_default_model(real_model):
    """Two known CounterFact facts, each edited alone with the preset: the edit lands, neighbours keep their answers
    about as often as unedited."""
    rewrites, kept = single_edits_of_known_facts(real_model, "wise", 2, str(DATA / "counterfact" / "counterfact_preknown.json"))
    assert all(rewrites) and len(rewrites) == 2
    assert sum(kept) >= 0.8 * len(kept)


@pytest.mark.parametrize("editor, overrides", [("grace", "{layer: 0, value_steps: 3}"), ("wise", "{layer: 1, steps: 2}")])
def test_retention_edit_runs_the_memory_editors_in_single_mode(tiny_llama, tmp_path, editor, overrides):
    from retention.commands.edit import main

    out = tmp_path / editor
    assert main(["--model", "tiny-llama", "--editor", editor, "--data", "builtin", "--n", "2", "--select_known",
                 "none", "--mode", "single", "--out", str(out), "--hparams", "smollm2-135m", "--set", overrides]) == 0
    folders = sorted((out / "edits").iterdir())
    assert len(folders) == 2 and all((f / MEMORY_FILE).is_file() for f in folders)
    loaded = load_edit_result(folders[0])
    assert isinstance(loaded, MemoryEditResult) and loaded.editor == editor and loaded.memory.kind == editor


@pytest.mark.parametrize("editor, overrides", [("grace", "{layer: 0, value_steps: 3}"), ("wise", "{layer: 1, steps: 2}")])
def test_retention_edit_saves_a_batch_memory_edit_and_no_empty_edited_weights(tiny_llama, tmp_path, editor, overrides):
    """A memory edit changes no weight: an empty edited-weights file would pass as a valid ``edits.precomputed``."""
    from retention.commands.edit import main
    from retention.data.edit_folder import EDITED_WEIGHTS

    out = tmp_path / editor
    assert main(["--model", "tiny-llama", "--editor", editor, "--data", "builtin", "--n", "2", "--select_known",
                 "none", "--mode", "sequential", "--batch_size", "1", "--out", str(out), "--hparams", "smollm2-135m",
                 "--set", overrides]) == 0
    loaded = load_edit_result(out / "edit")
    assert isinstance(loaded, MemoryEditResult) and len(loaded.case_ids) == 2
    assert not (out / EDITED_WEIGHTS).exists() and not (out / "model").exists()
