"""AnchorEdits: the penalty is zero at the anchors and its gradient points back to them; the EWC Fisher is zero
where the edit prompts do not reach and positive in the edited layer; method none or strength 0 trains bit for
bit as no callback; a strong l2 anchor keeps the edited layer closer to its edited weights."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from retention.arch import ArchAdapter
from retention.callbacks.anchor import AnchorEdits, anchored_parameters, fisher_diagonal
from retention.data.readers import load_records
from retention.data.selection import KnowledgeSets
from retention.modules.finetune import FineTuneModule, OptimizerArgs
from retention.pipeline_contract import PipelineCallback, PipelineState
from retention.tokens import prompt_ids, target_ids

EDITED = [1]


@pytest.fixture(scope="module")
def sets() -> KnowledgeSets:
    return KnowledgeSets(edit=load_records("builtin")[:4])


def _module(tiny_llama, sets) -> SimpleNamespace:
    model, tok = tiny_llama
    return SimpleNamespace(model=copy.deepcopy(model), tokenizer=tok, log=lambda *a, **k: None,
                           pipeline=PipelineState(sets=sets, edited_layers=list(EDITED)))


TRAINER = SimpleNamespace(accumulate_grad_batches=1, precision_plugin=SimpleNamespace())


def _started(tiny_llama, sets, **kw) -> tuple[AnchorEdits, SimpleNamespace]:
    callback, module = AnchorEdits(**kw), _module(tiny_llama, sets)
    callback.on_fit_start(TRAINER, module)
    return callback, module


@pytest.mark.parametrize("method", ["l2", "ewc"])
def test_penalty_is_zero_at_the_anchors_and_its_gradient_points_back(tiny_llama, sets, method):
    strength = 3.0
    callback, module = _started(tiny_llama, sets, method=method, strength=strength)
    layer = ArchAdapter.for_model(module.model).layer_name(EDITED[0])
    assert callback.params and all(n.startswith(layer + ".") for n in callback.params)
    for p in callback.params.values():
        p.grad = torch.zeros_like(p)
    callback.on_after_backward(TRAINER, module)
    assert callback.penalty == 0 and all(not p.grad.any() for p in callback.params.values())

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in callback.params.values():
            p += 0.01 * torch.randn(p.shape, generator=g)
            p.grad = torch.zeros_like(p)
    callback.on_after_backward(TRAINER, module)
    weights = {n: callback.weights[n] if method == "ewc" else torch.ones_like(p) for n, p in callback.params.items()}
    for name, p in callback.params.items():
        torch.testing.assert_close(p.grad, strength * weights[name] * (p.detach() - callback.anchors[name]))
    assert callback.penalty > 0

    def distance() -> float:
        return sum(float((weights[n] * (p.detach() - callback.anchors[n]) ** 2).sum())
                   for n, p in callback.params.items())

    before = distance()
    stable = 1 / (strength * max(float(w.max()) for w in weights.values()))  # below 2 / (lambda * max w)
    torch.optim.SGD(list(callback.params.values()), lr=stable).step()  # a step on the penalty alone
    assert distance() < before


def test_fisher_is_zero_where_the_edit_prompts_do_not_reach_and_positive_in_the_edited_layer(tiny_gpt2, tiny_llama,
                                                                                            sets):
    model, tok = tiny_gpt2
    positions = model.get_submodule("transformer.wpe").weight  # GPT-2's learned positions, untied
    params = {"positions": positions, **anchored_parameters(model, set(EDITED))}
    pairs = [(r.rewrite_prompt, r.target_new) for r in sets.edit]
    fisher = fisher_diagonal(model, tok, pairs, params)
    longest = max(len(prompt_ids(tok, p) + target_ids(tok, t)) for p, t in pairs)
    # A sequence's last position predicts nothing scored: only positions before every edit sequence's last count.
    assert not fisher["positions"][longest - 1:].any()
    assert fisher["positions"][: longest - 1].abs().sum(1).gt(0).all()
    assert all(f.min() >= 0 for f in fisher.values())
    assert any(f.max() > 0 for n, f in fisher.items() if n != "positions")
    assert not any(p.grad is not None for p in model.parameters())  # the estimate leaves .grad alone
    callback, _ = _started(tiny_llama, sets, method="ewc", strength=1.0)
    weights = torch.cat([w.flatten() for w in callback.weights.values()])
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-4)  # normalised: a scale comparable to l2


def test_a_resumed_callback_keeps_the_checkpoints_anchors(tiny_llama, sets):
    callback, module = _started(tiny_llama, sets, method="ewc", strength=1.0)
    state = callback.state_dict()
    with torch.no_grad():  # training moved the weights since
        for p in callback.params.values():
            p += 0.1
    resumed = AnchorEdits(method="ewc", strength=1.0)
    resumed.load_state_dict(state)
    resumed.on_fit_start(TRAINER, module)
    for name in callback.anchors:
        assert torch.equal(resumed.anchors[name], callback.anchors[name])
        assert torch.equal(resumed.weights[name], callback.weights[name])


class _Edited(PipelineCallback):
    """Stands in for ApplyEdits: names the edited layers."""

    def on_base_model_ready(self, trainer, pl_module):
        pl_module.pipeline.edited_layers = list(EDITED)


def _train(tiny_llama, callbacks, steps: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights before, after) ``steps`` AdamW steps on fixed random sequences."""
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 16), generator=g)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    loader = DataLoader(rows, batch_size=4)
    module = FineTuneModule.from_model(model, tok, optimizer=OptimizerArgs(lr=1e-2, schedule="constant"))
    torch.manual_seed(0)
    Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[_Edited(), *callbacks]).fit(module, loader)
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_off_trains_bit_for_bit_as_no_callback_and_a_strong_anchor_holds_the_edited_layer(tiny_llama):
    _, plain = _train(tiny_llama, [])
    for off in (AnchorEdits(), AnchorEdits(method="l2", strength=0.0)):
        _, after = _train(tiny_llama, [off])
        assert all(torch.equal(after[n], plain[n]) for n in plain)
    before, anchored = _train(tiny_llama, [AnchorEdits(method="l2", strength=1e4)])
    layer = ArchAdapter.for_model(tiny_llama[0]).layer_name(EDITED[0]) + "."

    def drift(weights):
        return sum(float((weights[n] - before[n]).norm() ** 2) for n in before if n.startswith(layer))

    assert 0 < drift(anchored) < 0.5 * drift(plain)


@pytest.mark.parametrize(("kwargs", "flag"), [({"method": "ridge"}, "--anchor.method"),
                                              ({"strength": -1.0}, "--anchor.strength"),
                                              ({"layers": "some"}, "--anchor.layers"),
                                              ({"window": -1}, "--anchor.window")])
def test_bad_arguments_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        AnchorEdits(**kwargs)


def test_sharded_strategies_are_refused_before_any_work():
    trainer = SimpleNamespace(strategy=object.__new__(ModelParallelStrategy))
    with pytest.raises(ValueError, match="--anchor.method l2"):
        AnchorEdits(method="l2", strength=1.0).setup(trainer, None, "fit")
    AnchorEdits().setup(trainer, None, "fit")  # off: nothing to refuse


def test_nothing_edited_is_refused_naming_the_flag(tiny_llama, sets):
    module = _module(tiny_llama, sets)
    module.pipeline.edited_layers = []
    with pytest.raises(ValueError, match="--anchor.layers edited"):
        AnchorEdits(method="l2", strength=1.0).on_fit_start(TRAINER, module)


def test_with_lora_the_anchored_parameters_are_the_anchored_layers_adapters(tiny_llama):
    from retention.modules.finetune import AdapterArgs

    model, tok = tiny_llama
    module = FineTuneModule.from_model(copy.deepcopy(model), tok, adapter=AdapterArgs(method="lora", rank=2))
    module.configure_model()
    names = anchored_parameters(module.model, set(EDITED))
    layer = ArchAdapter.for_model(module.model).layer_name(EDITED[0]) + "."
    adapters = {n for n, p in ArchAdapter.for_model(module.model).model.named_parameters()
                if p.requires_grad and n.startswith(layer)}
    assert names and set(names) == adapters and all("lora_" in n for n in names)
