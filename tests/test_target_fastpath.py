"""The v*/z optimiser's split chunks (the positions before the subjects run once, their keys and values held)
give the δ that running every position at every step gives."""

from __future__ import annotations

import pytest
import torch
from editing_models import FACT, OTHER, edit_model

from bench.reference import FullPositionsTargetOptimiser, average_key
from retention.editing.base import EditRequest
from retention.editing.context import EditorContext
from retention.editing.targets import TargetHParams, TargetOptimiser

AUGMENTED = EditRequest("3", "Toko Yasuda", "{} plays the", "piano", "guitar", ("The music of {} uses the",))
TEMPLATES = ["{}", "Hello there. {}", "A b c d e f. {}"]
REQUESTS = [FACT, OTHER, AUGMENTED]


def _run(cls, model, tokenizer, site: str, max_rows: int) -> tuple[TargetOptimiser, list]:
    hp = TargetHParams(v_steps=6, v_lr=0.5, v_weight_decay=0.1, clamp_norm_factor=1e4, early_stop_loss=0.0)
    opt = cls(EditorContext(model, tokenizer), REQUESTS, TEMPLATES, hp, 0, site, max_rows)
    return opt, opt.run()


@pytest.mark.parametrize(("kind", "site"), [("llama", "mlp_out"), ("gpt2", "layer")])
def test_held_prefix_keys_give_the_same_delta(tiny_llama, kind, site, monkeypatch):
    tokenizer = tiny_llama[1]
    model = edit_model(kind, len(tokenizer))
    built = []
    build = TargetOptimiser._build
    monkeypatch.setattr(TargetOptimiser, "_build", lambda self, chunk, split: built.append(build(self, chunk, split))
                        or built[-1])
    # 8 rows a chunk: chunks mix facts, phrasings and a KL row, so their rows split at different positions.
    _, fast = _run(TargetOptimiser, model, tokenizer, site, 8)
    split = [c for c in built if c.held]
    assert split, "no chunk held its prefix keys"
    assert any(len(set((c.positions[:, 0]).tolist())) > 1 and len(c.kl_row) > 0 for c in split)
    built.clear()
    _, plain = _run(FullPositionsTargetOptimiser, model, tokenizer, site, 8)
    assert built and not any(c.held for c in built)
    for a, b in zip(fast, plain):
        assert torch.allclose(a.init, b.init, atol=1e-5)
        # Equal up to float rounding: the held and run positions are attended to in another order and padding.
        assert ((a.delta - b.delta).norm() / b.delta.norm()).item() < 1e-4
        assert a.steps == b.steps == 5
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
        assert a.kl == pytest.approx(b.kl, rel=1e-3, abs=1e-7)
    for req, a in zip(REQUESTS, fast):
        if site == "layer":
            assert a.key is None
        else:  # ROME's k̄, read on the first step
            k = average_key(model, tokenizer, 0, req, TEMPLATES)
            assert a.key.dtype == torch.float64 and ((a.key - k).norm() / k.norm()).item() < 1e-6


def test_a_sliding_window_model_runs_every_position(tiny_llama, monkeypatch):
    """The held keys' mask is full causal attention: a model with sliding-window layers is not split."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = tiny_llama[1]
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                      max_window_layers=2, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    built = []
    build = TargetOptimiser._build
    monkeypatch.setattr(TargetOptimiser, "_build", lambda self, chunk, split: built.append(split)
                        or build(self, chunk, split))
    _, fast = _run(TargetOptimiser, model, tokenizer, "mlp_out", 8)
    _, plain = _run(FullPositionsTargetOptimiser, model, tokenizer, "mlp_out", 8)
    assert built and not any(built)
    for a, b in zip(fast, plain):
        assert torch.equal(a.delta, b.delta)
