import logging
import random

import pytest
import torch
import yaml

from retention import corpus as corpora
from retention.arch import ArchAdapter
from retention.editing import covariance
from retention.editing.base import PRESETS
from retention.editing.covariance import CovarianceSpec, key_covariances
from retention.editing.rome import RomeHParams
from retention.editing.trace import capture


@pytest.fixture
def corpus(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    rng = random.Random(1)
    words = "alpha beta gamma delta river city music war king film the of and a in".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(100)), encoding="utf-8")
    return path



def key_covariance(model, tokenizer, layer: int, spec, fingerprint=None, cache=True):
    """C of one layer."""
    return key_covariances(model, tokenizer, [layer], spec, fingerprint, cache)[layer]


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
    with pytest.raises(FileNotFoundError, match="mom2_corpus '.*missing.txt' is not a file"):
        key_covariance(model, tokenizer, 0, _spec(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="fewer than"):
        key_covariance(model, tokenizer, 0, _spec(short))


def test_wikitext2_is_found_through_the_env_var_or_beside_the_checkout(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "wikitext").mkdir(parents=True)
    (data / "wikitext" / "wiki.test.raw").write_text(" = Title = \n\n Some text .\n", encoding="utf-8")
    monkeypatch.setenv("RETENTION_DATA", str(data))
    text, identity = corpora.corpus_text("wikitext2")
    assert "Some text" in text
    # the same file named by path (expanded variable) has the same identity, so cached statistics stay valid
    assert corpora.corpus_text("$RETENTION_DATA/wikitext/wiki.test.raw") == (text, identity)
    assert identity.startswith("file:wiki.test.raw:")

    monkeypatch.delenv("RETENTION_DATA")
    monkeypatch.setattr(corpora, "_CHECKOUT", tmp_path / "nowhere")  # not a source checkout
    with pytest.raises(FileNotFoundError, match="mom2_corpus 'wikitext2' needs the shared data folder: set RETENTION_DATA"):
        corpora.corpus_text("wikitext2", what="mom2_corpus")
    monkeypatch.setenv("RETENTION_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="wiki.test.raw does not exist.*set RETENTION_DATA"):
        corpora.corpus_text("wikitext2")
    monkeypatch.delenv("RETENTION_DATA")
    with pytest.raises(FileNotFoundError, match="environment variable RETENTION_DATA is not set"):
        corpora.corpus_text("$RETENTION_DATA/wikitext/wiki.test.raw")


def test_a_corpus_path_in_a_yaml_file_is_relative_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "hp"
    folder.mkdir()
    (folder / "corpus.txt").write_text("text", encoding="utf-8")
    (folder / "rome.yaml").write_text("layer: 0\nmom2_corpus: corpus.txt\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # not the file's folder
    hp = RomeHParams.from_yaml("hp/rome.yaml")
    assert hp.mom2_corpus == str(folder / "corpus.txt")
    assert corpora.corpus_text(hp.mom2_corpus)[0] == "text"
    for spec in ("builtin", "wikitext2", "hf:wikitext:wikitext-2-raw-v1", "$HOME/x.txt", "/abs/x.txt"):
        # mom2_adjustment off: the corpus is kept as written, not resolved (most of these are not readable here)
        (folder / "rome.yaml").write_text(f"mom2_adjustment: false\nmom2_corpus: '{spec}'\n", encoding="utf-8")
        assert RomeHParams.from_yaml(folder / "rome.yaml").mom2_corpus == spec
    # on the command line (a mapping), relative to the current directory
    assert RomeHParams.from_dict({"mom2_corpus": "hp/corpus.txt"}).mom2_corpus == "hp/corpus.txt"
    assert corpora.corpus_text("hp/corpus.txt")[0] == "text"


def test_hub_corpus_without_datasets_names_the_extra(monkeypatch):
    real = corpora.importlib.util.find_spec
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'retention\[hf\]'"):
        corpora.corpus_text("hf:wikitext:wikitext-2-raw-v1")


def test_shipped_presets_name_no_path_relative_to_the_current_directory(tmp_path, monkeypatch):
    for preset in sorted(PRESETS.glob("*/*.yaml")):
        spec = yaml.safe_load(preset.read_text()).get("mom2_corpus")
        specs = [] if spec is None else [spec] if isinstance(spec, str) else spec
        assert all(corpora.is_named(s) for s in specs), f"{preset}: mom2_corpus {spec!r}"
    (tmp_path / "wikitext").mkdir()
    (tmp_path / "wikitext" / "wiki.test.raw").write_text("text", encoding="utf-8")
    monkeypatch.setenv("RETENTION_DATA", str(tmp_path))
    assert RomeHParams.from_yaml(PRESETS / "rome" / "smollm2-135m.yaml").mom2_corpus == "wikitext2"
