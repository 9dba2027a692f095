import pytest
import torch
from transformers import AutoModelForCausalLM, GPTJConfig, GPTNeoXConfig, MistralConfig, Qwen2Config, T5Config

from retention.arch import ArchAdapter, UnsupportedArchitecture


def _build(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_llama_adapter(tiny_llama):
    model, _ = tiny_llama
    a = ArchAdapter.for_model(model)
    assert a.num_layers == 2 and a.hidden_size == 64
    assert a.mlp_out(1) is model.model.layers[1].mlp.down_proj
    assert a.mlp_out_name(1) == "model.layers.1.mlp.down_proj"
    assert not a.weight_is_in_out
    assert a.final_norm is model.model.norm and a.lm_head.weight is a.embed.weight
    assert a.mlp_out_weight(0).shape == (64, 128)  # [out, in]
    assert a.layer_index_of("model.layers.1.self_attn.q_proj.weight") == 1
    assert a.layer_index_of("model.embed_tokens.weight") is None


def test_gpt2_adapter_conv1d(tiny_gpt2):
    model, _ = tiny_gpt2
    a = ArchAdapter.for_model(model)
    assert a.weight_is_in_out
    w = a.mlp_out_weight(0)
    assert w.shape == (256, 64)  # Conv1D stores [in, out]
    assert a.weight_to_out_in(w).shape == (64, 256)
    delta = torch.randn(64, 256)
    assert a.delta_to_weight(delta).shape == w.shape
    x = torch.randn(3, 256)
    # The canonical [out, in] matrix applied to a key equals the module's own (bias-free) output.
    expected = a.mlp_out(0)(x) - a.mlp_out(0).bias
    assert torch.allclose(x @ a.weight_to_out_in(w).T, expected, atol=1e-5)
    assert a.final_norm is model.transformer.ln_f


@pytest.mark.parametrize(
    "config, mlp_out",
    [
        (MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2), "mlp.down_proj"),
        (Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2), "mlp.down_proj"),
        (GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=8), "mlp.fc_out"),
        (GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4), "mlp.dense_4h_to_h"),
    ],
)
def test_other_architectures(config, mlp_out):
    model = _build(config)
    a = ArchAdapter.for_model(model)
    assert a.num_layers == 2
    assert a.mlp_out_name(0).endswith(f"0.{mlp_out}")
    assert isinstance(a.mlp_out(0), torch.nn.Linear) and not a.weight_is_in_out
    assert a.lm_head is model.get_output_embeddings()
    with pytest.raises(IndexError, match="out of range"):
        a.layer(5)


def test_unsupported_architecture_is_named():
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                d_kv=8))
    with pytest.raises(UnsupportedArchitecture, match="model_type='t5'"):
        ArchAdapter.for_model(model)
