"""FreezeLayers: every policy's layer set, and after fine-tuning (full and LoRA) frozen weights are bit-identical
while the trainable ones changed."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from retention.arch import ArchAdapter
from retention.callbacks.freeze import FreezeLayers, frozen_layers
from retention.modules.finetune import AdapterArgs, FineTuneModule, OptimizerArgs
from retention.pipeline_contract import PipelineCallback, PipelineState

N_LAYERS = 6
EDITED = [2, 3]


def test_policy_layer_sets():
    def f(policy, **kw):
        return frozen_layers(policy, 8, [3, 4], **kw)

    assert f("none") == set()
    assert f("edited") == {3, 4}
    assert f("window", window=1) == {2, 3, 4, 5}
    assert f("window", window=0) == {3, 4}
    assert f("upto") == {0, 1, 2, 3, 4}
    assert f("only_edited") == {0, 1, 2, 5, 6, 7}
    assert f("list", layers=[0, -1]) == {0, 7}
    assert frozen_layers("window", 8, [0], window=2) == {0, 1, 2}
    with pytest.raises(ValueError, match="after ApplyEdits"):
        frozen_layers("edited", 8, [])
    with pytest.raises(ValueError, match="out of range"):
        frozen_layers("list", 8, None, layers=[8])
    with pytest.raises(ValueError, match="policy 'list' needs layers"):
        FreezeLayers("list")


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "bogus"}, r"^freeze\.policy='bogus': unknown; choose from none, edited"),
    ({"policy": "list"}, r"^freeze\.layers: policy 'list' needs layers"),
    ({"policy": "edited", "layers": [1]}, r"^freeze\.layers=\[1\]: layers are given only with freeze\.policy 'list'"),
    ({"policy": "window", "window": -1}, r"^freeze\.window=-1: must be >= 0$"),
])
def test_option_errors_name_the_flag_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FreezeLayers(**kwargs)


class _Edited(PipelineCallback):
    """Stands in for ApplyEdits: declares the edited layers in the contract hook."""

    def on_base_model_ready(self, trainer, pl_module):
        pl_module.pipeline.edited_layers = list(EDITED)


def _model(vocab: int):
    """A 6-layer random Llama: enough layers to tell the policies apart."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _loader(vocab: int) -> DataLoader:
    ids = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids], batch_size=4)


def _layer_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


EXPECTED = {
    "none": set(),
    "edited": {2, 3},
    "window": {1, 2, 3, 4},
    "upto": {0, 1, 2, 3},
    "only_edited": {0, 1, 4, 5},
    "list": {0, 5},
    "located": {4},
}


@pytest.mark.parametrize(
    "policy,method",
    [(p, "full") for p in EXPECTED] + [(p, "lora") for p in ("edited", "window", "only_edited")],
)
def test_frozen_weights_bit_identical_after_fine_tuning(policy, method, tiny_llama, tmp_path, monkeypatch):
    tok = tiny_llama[1]
    model = _model(len(tok))
    if policy == "located":
        from retention.editing.causal_trace import save_located

        monkeypatch.setenv("RETENTION_CACHE", str(tmp_path))  # after the tokenizer came from the real cache
        save_located(model, [4])
    before = _layer_state(model)
    arch = ArchAdapter.for_model(model)
    freeze = FreezeLayers(policy, window=1, layers=[0, 5] if policy == "list" else None)
    module = FineTuneModule.from_model(model, tok, adapter=AdapterArgs(method=method, rank=4, dropout=0.0),
                                       optimizer=OptimizerArgs(lr=1e-2, schedule="constant"))
    Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[_Edited(), freeze]).fit(module, _loader(len(tok)))
    assert module.pipeline.frozen_layers == EXPECTED[policy] == freeze.frozen
    after = _layer_state(module.merged_model())
    for i in range(N_LAYERS):
        prefix = arch.layer_name(i) + "."
        changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
        assert changed == (i not in EXPECTED[policy]), f"layer {i} changed={changed} under {policy}/{method}"
    if method == "lora":
        lora_layers = {arch.layer_index_of(n) for n, _ in module.model.named_parameters() if "lora_" in n}
        assert lora_layers == set(range(N_LAYERS)) - EXPECTED[policy]
    if policy == "only_edited" and method == "full":
        embed = "model.embed_tokens.weight"
        assert torch.equal(before[embed], after[embed]) and torch.equal(before["model.norm.weight"], after["model.norm.weight"])


def test_located_layers_are_read_before_the_edits_change_the_weights(tiny_llama, tmp_path, monkeypatch):
    """Located layers are keyed by the base model's weights: ApplyEdits calls on_before_edits while the model is
    still the base model, so editing afterwards does not lose them."""
    from types import SimpleNamespace

    from retention.editing.causal_trace import save_located

    model = _model(len(tiny_llama[1]))
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path))
    save_located(model, [1, 2])
    module = SimpleNamespace(model=model, pipeline=PipelineState(edited_layers=[4]))
    freeze = FreezeLayers("located")
    freeze.on_before_edits(None, module, [])
    with torch.no_grad():
        ArchAdapter.for_model(model).mlp_out(4).weight.add_(1.0)  # the edit
    freeze.on_base_model_ready(None, module)
    assert module.pipeline.frozen_layers == {1, 2}
