import pytest
import torch

from retention.models import ModelNotFound, load_model, model_fingerprint
from retention.scoring import greedy_generate


def test_tiny_models_are_seeded_and_fp32(tiny_llama):
    model, tok = tiny_llama
    again, _ = load_model("tiny-llama")
    assert model_fingerprint(model) == model_fingerprint(again)
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "right"


def test_fingerprint_changes_with_weights(tiny_gpt2):
    model, _ = tiny_gpt2
    before = model_fingerprint(model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight[0, 0] += 1.0
    try:
        assert model_fingerprint(model) != before
    finally:
        with torch.no_grad():
            model.transformer.h[0].mlp.c_proj.weight[0, 0] -= 1.0


def test_missing_model_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="not found: it is not a built-in name"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
def test_default_model_knows_paris(real_model):
    model, tok = real_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    out = greedy_generate(model, tok, ["The capital of France is"], max_new_tokens=5)[0]
    assert "Paris" in out


def _unreachable_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    from retention import models

    models._hub_answer.cache_clear()


def test_an_unknown_name_fails_at_once_when_the_hub_is_unreachable(monkeypatch):
    """It used to spend about a minute on the hub's retries (51 s for `retention probe --model tiny-lama`)."""
    import time

    _unreachable_hub(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFound, match=r"model 'tiny-lama' not found: it is not a built-in name \(smollm2-135m, "
                                            r"tiny-llama, tiny-gpt2\).*could not be reached.*did you mean 'tiny-llama'"):
        load_model("tiny-lama")
    assert time.perf_counter() - t0 < 5


def test_probe_refuses_an_unknown_model_in_one_line_with_exit_2_before_reading_data(monkeypatch, capsys):
    from retention.cli import main

    _unreachable_hub(monkeypatch)
    assert main(["probe", "--model", "tiny-lama", "--data", "no-such-file.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retention probe: error: --model: model 'tiny-lama' not found") and err.count("\n") == 1
