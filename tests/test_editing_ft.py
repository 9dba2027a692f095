import pytest
import torch
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

from retention.arch import ArchAdapter
from retention.editing.base import EditRequest, run_edits
from retention.editing.ft import FtEditor, FtHParams
from retention.scoring import score_probes


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ft_m_lands_the_edit_in_the_chosen_layer_and_reverts_exactly(tiny_llama, kind):
    tokenizer = tiny_llama[1]
    model = edit_model(kind, len(tokenizer))
    saved = state(model)
    probe = rewrite_probe(FACT)
    lp_unrelated = next_token_logprobs(model, tokenizer, UNRELATED)
    lp_rewrite = next_token_logprobs(model, tokenizer, probe.prompt)
    result = FtEditor(FtHParams(variant="ft-m", layers=[1], lr=1e-2, steps=30, norm_constraint=None)).edit(
        model, tokenizer, [FACT])
    assert same_state(model, saved)
    adapter = ArchAdapter.for_model(model)
    assert list(result.deltas) == [adapter.mlp_out_name(1) + ".weight"] and result.layers == [1]
    assert result.deltas[adapter.mlp_out_name(1) + ".weight"].shape == adapter.mlp_out_weight(1).shape
    losses = result.diagnostics[0].losses
    assert losses[-1] < losses[0]
    result.apply(model)
    assert score_probes(model, tokenizer, [probe])[0].passed["top1"]
    moved = kl(lp_rewrite, next_token_logprobs(model, tokenizer, probe.prompt))
    # Unconstrained fine-tuning is not local (that is ROME's point), but the edited prompt moves most.
    assert kl(lp_unrelated, next_token_logprobs(model, tokenizer, UNRELATED)) < moved
    result.revert(model)
    assert same_state(model, saved)


def test_ft_l_respects_the_norm_constraint(tiny_llama):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    eps = 2e-3
    result = FtEditor(FtHParams(variant="ft-l", layers=[0, 1], lr=1e-2, steps=10, norm_constraint=eps)).edit(
        model, tokenizer, [FACT, OTHER])
    assert result.layers == [0, 1] and len(result.deltas) == 2 and result.case_ids == ["1", "2"]
    for delta in result.deltas.values():
        assert delta.abs().max() <= eps * (1 + 1e-6) and delta.abs().max() > 0.5 * eps


def test_ft_trains_the_same_as_fine_tuning_the_weight(tiny_llama):
    """One Adam step on the float32 output delta equals one Adam step on the projection weight itself."""
    tokenizer = tiny_llama[1]
    model = edit_model("gpt2", len(tokenizer))
    hp = FtHParams(variant="ft-m", layers=[0], lr=1e-3, steps=1, norm_constraint=None, early_stop_loss=0.0)
    result = FtEditor(hp).edit(model, tokenizer, [FACT])

    adapter = ArchAdapter.for_model(model)
    weight = adapter.mlp_out_weight(0)
    before = weight.detach().clone()
    opt = torch.optim.Adam([weight], lr=1e-3)
    prompt = tokenizer(FACT.rewrite_prompt)["input_ids"]
    target = tokenizer(" " + FACT.target_new, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target[:-1]])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 :]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target))
    opt.zero_grad()
    loss.backward()
    opt.step()
    expected = weight.detach() - before
    with torch.no_grad():
        weight.copy_(before)
    model.zero_grad(set_to_none=True)
    assert result.diagnostics[0].losses[0] == pytest.approx(loss.item(), rel=1e-5)
    (delta,) = result.deltas.values()
    assert torch.allclose(delta, expected, atol=1e-5)


def test_ft_sequential_and_augmentations(tiny_llama):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    saved = state(model)
    augmented = EditRequest("3", "Danielle Darrieux", "The mother tongue of {}", "English", "French",
                            ("The language spoken natively by {}",))
    editor = FtEditor(FtHParams(variant="ft-m", layers=[1], lr=1e-2, steps=30, norm_constraint=None))
    results = run_edits(editor, model, tokenizer, [augmented, OTHER], "sequential")
    assert all(r.passed["top1"] for r in score_probes(model, tokenizer, [rewrite_probe(augmented), rewrite_probe(OTHER)]))
    for r in reversed(results):
        r.revert(model)
    assert same_state(model, saved)


def test_ft_hparams_validation():
    with pytest.raises(ValueError, match="variant"):
        FtHParams(variant="ft-x")
    with pytest.raises(ValueError, match="norm_constraint"):
        FtHParams(norm_constraint=0.0)
    assert FtHParams.from_dict({"norm_constraint": None, "lr": "5e-4"}).lr == 5e-4


def test_ft_layers_outside_the_model_are_an_error(tiny_llama):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match="layers: 5 is out of range for a model with 2 layers"):
        FtEditor(FtHParams(variant="ft-m", layers=[1, 5], steps=1)).edit(model, tokenizer, [FACT])


@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("lr", float("nan")), ("norm_constraint", float("nan"))])
def test_ft_settings_must_be_finite(field, value):
    with pytest.raises(ValueError, match="lr|norm_constraint"):
        FtHParams(**{"variant": "ft-m", "layers": [0], "lr": 1e-3, "steps": 2, **{field: value}}).validate()
