import logging
import random

import pytest
import torch

from retention.arch import ArchAdapter
from retention.editing import covariance
from retention.editing.covariance import CovarianceSpec, key_covariance, key_covariances
from retention.editing.trace import capture


@pytest.fixture
def corpus(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    rng = random.Random(1)
    words = "alpha beta gamma delta river city music war king film the of and a in".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(100)), encoding="utf-8")
    return path


def _spec(corpus, **kw):
    return CovarianceSpec(**{"corpus": str(corpus), "samples": 12, "max_length": 16, "batch_size": 5, **kw})


def _files(tmp_path):
    return sorted((tmp_path / "cache" / "covariance").rglob("*.safetensors"))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_covariance_is_the_mean_outer_product_of_the_keys(request, corpus, which):
    model, tokenizer = request.getfixturevalue(which)
    spec = _spec(corpus)
    c = key_covariance(model, tokenizer, 1, spec)
    windows = covariance._windows(tokenizer, corpus.read_text(), spec)
    assert windows.shape == (12, 16)
    module = ArchAdapter.for_model(model).mlp_out(1)
    with torch.no_grad(), capture({"k": module}, outputs=False) as rec:
        model(input_ids=windows)
    k = rec["k"].input.reshape(-1, rec["k"].input.shape[-1]).double()
    assert c.dtype == torch.float64 and c.shape == (k.shape[1], k.shape[1])
    assert torch.allclose(c, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-12)
    assert torch.allclose(c, c.T)


def test_forward_stops_after_the_needed_layer(tiny_llama, corpus):
    model, tokenizer = tiny_llama
    adapter = ArchAdapter.for_model(model)
    calls = []
    handles = [adapter.layer(1).register_forward_hook(lambda *a: calls.append(1)),
               adapter.final_norm.register_forward_hook(lambda *a: calls.append(2))]
    try:
        key_covariance(model, tokenizer, 0, _spec(corpus), cache=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_cache_hit_miss_and_corruption(tiny_llama, corpus, tmp_path, monkeypatch, caplog):
    model, tokenizer = tiny_llama
    spec = _spec(corpus)
    first = key_covariances(model, tokenizer, [0, 1], spec)
    files = _files(tmp_path)
    assert len(files) == 2

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(covariance, "_compute", no_compute)
        hit = key_covariances(model, tokenizer, [0, 1], spec)
    assert all(torch.equal(hit[i], first[i]) for i in (0, 1))

    key_covariance(model, tokenizer, 0, _spec(corpus, samples=6))  # another sample count: a new entry
    key_covariance(model, tokenizer, 0, _spec(corpus, max_length=8))
    assert len(_files(tmp_path)) == 4

    target = files[0]
    data = bytearray(target.read_bytes())
    data[-8:] = b"\x00" * 8  # flip the last entry of C: the digest catches it
    target.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = key_covariances(model, tokenizer, [0, 1], spec)
    assert f"{target.name} does not match its recorded digest" in caplog.text
    assert all(torch.equal(again[i], first[i]) for i in (0, 1))

    target.write_bytes(target.read_bytes()[:100])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(key_covariances(model, tokenizer, [0, 1], spec)[0], first[0])
    assert f"{target.name} has 100 bytes" in caplog.text


def test_key_changes_with_weights(tiny_llama, corpus, tmp_path):
    model, tokenizer = tiny_llama
    spec = _spec(corpus)
    key_covariance(model, tokenizer, 0, spec, fingerprint="aaaa")
    key_covariance(model, tokenizer, 0, spec, fingerprint="bbbb")
    assert {p.parent.name for p in _files(tmp_path)} == {"aaaa", "bbbb"}


def test_spec_and_corpus_errors(tiny_llama, corpus, tmp_path):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="max_length=0"):
        CovarianceSpec(max_length=0)
    with pytest.raises(FileNotFoundError, match="mom2_corpus='.*missing.txt' is not a file"):
        key_covariance(model, tokenizer, 0, _spec(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="fewer than"):
        key_covariance(model, tokenizer, 0, _spec(short))
