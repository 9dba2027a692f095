"""Every cache under ``$RETENTION_CACHE`` is verified on read: a damaged entry is logged and recomputed (never
used), and the temporaries of interrupted writes are removed by the next run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from editing_models import edit_model
from memit_cases import REQUESTS, tiny_hparams, write_corpus

from retention import models
from retention.editing import causal_trace
from retention.editing.alphaedit import AlphaEditEditor, AlphaEditHParams
from retention.editing.causal_trace import LayersNotLocated, located_layers, save_located
from retention.editing.locate_then_edit import context_templates


@pytest.fixture
def cache(tmp_path, tiny_llama, monkeypatch):
    """A private cache folder (set after the tiny models are loaded: they use the default tokenizer from the
    shared cache)."""
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _overwrite_tail(path, data: bytes) -> None:
    """Overwrite the last bytes of a file in place (a safetensors header stays intact)."""
    content = bytearray(path.read_bytes())
    content[-len(data):] = data
    path.write_bytes(bytes(content))


def _tamper(path, field: str, change) -> None:
    """Change ``field`` (wherever it is nested) of a JSON file, leaving it well-formed."""
    def walk(obj):
        if isinstance(obj, dict):
            return {k: change(v) if k == field else walk(v) for k, v in obj.items()}
        return obj

    path.write_text(json.dumps(walk(json.loads(path.read_text()))))


def test_corrupt_projector_values_are_recomputed(cache, tiny_llama, tmp_path, caplog):
    tokenizer = tiny_llama[1]
    model = edit_model("gpt2", len(tokenizer))
    hp = AlphaEditHParams(**tiny_hparams(write_corpus(tmp_path), layers=[1], mom2_samples=20, v_steps=10),
                          nullspace_threshold=1e-2, relative_threshold=True)
    clean = AlphaEditEditor(hp).edit(model, tokenizer, REQUESTS[:2])
    (projector,) = (cache / "projectors").glob("*.safetensors")
    _overwrite_tail(projector, torch.full((64,), 3.0, dtype=torch.float64).numpy().tobytes())
    with caplog.at_level(logging.WARNING):
        again = AlphaEditEditor(hp).edit(model, tokenizer, REQUESTS[:2])
    assert clean.deltas.keys() == again.deltas.keys()
    assert all(torch.equal(clean.deltas[k], again.deltas[k]) for k in clean.deltas)
    assert f"{projector.name} does not match its recorded digest" in caplog.text


def test_truncated_prose_is_rebuilt(tmp_path, caplog):
    from retention.prose import builtin_prose

    folder = tmp_path / "prose"
    corpus = builtin_prose(min_bytes=20_000, cache=folder)
    (text,) = folder.glob("*.txt")
    text.write_bytes(text.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        assert builtin_prose(min_bytes=20_000, cache=folder) == corpus
    assert f"{text.name} has 1000 bytes" in caplog.text
    assert text.read_text(encoding="utf-8") == corpus


def test_edited_context_templates_are_regenerated(cache, tiny_llama, caplog):
    model, tokenizer = tiny_llama
    templates = context_templates(model, tokenizer, [[3, 2]], fingerprint="abc")
    (record,) = (cache / "context_templates").glob("*.json")
    _tamper(record, "templates", lambda t: [t[0], "Something else. {}", *t[2:]])
    with caplog.at_level(logging.WARNING):
        assert context_templates(model, tokenizer, [[3, 2]], fingerprint="abc") == templates
    assert "the record does not match its digest" in caplog.text
    assert context_templates(model, tokenizer, [[3, 2]], fingerprint="abc") == templates  # overwritten


def test_edited_located_layers_are_refused_until_located_again(tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(causal_trace, "cache_dir", lambda: tmp_path)
    model = tiny_llama[0]
    _tamper(save_located(model, [1], {"k": 1}), "layers", lambda _: [0])
    with caplog.at_level(logging.WARNING), pytest.raises(LayersNotLocated, match="failed its check: rerun"):
        located_layers(model)
    assert "does not match its digest" in caplog.text
    save_located(model, [1], {"k": 1})
    assert located_layers(model) == [1]


@pytest.fixture
def fake_gguf(cache, tiny_llama, tmp_path, monkeypatch):
    """A GGUF file whose conversion gives the tiny Llama (the real conversion takes a 100 MB file and 15 s);
    returns it and the list of conversions made."""
    gguf = tmp_path / "Tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    conversions = []

    def convert(path):
        conversions.append(path)
        return tiny_llama

    monkeypatch.setattr(models, "_dequantised_from_gguf", convert)
    return gguf, conversions


def test_truncated_converted_model_is_reconverted(fake_gguf, tiny_llama, caplog):
    from transformers import AutoModelForCausalLM

    gguf, conversions = fake_gguf
    folder = models._converted_folder(gguf)
    assert models._converted_folder(gguf) == folder and len(conversions) == 1
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        assert models._converted_folder(gguf) == folder
    assert len(conversions) == 2 and f"{folder.name}/model.safetensors has 1000 bytes" in caplog.text
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert models.model_fingerprint(loaded) == models.model_fingerprint(tiny_llama[0])


def test_a_killed_conversion_leaves_nothing_behind(fake_gguf, cache, caplog):
    gguf, conversions = fake_gguf
    killed = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from retention import models

        class Killed:
            def save_pretrained(self, folder):
                Path(folder).mkdir(parents=True, exist_ok=True)  # as transformers does
                (Path(folder) / "model.safetensors").write_bytes(bytes(10_000))
                os.kill(os.getpid(), signal.SIGKILL)

        models._dequantised_from_gguf = lambda gguf: (Killed(), Killed())
        models._converted_folder(Path({str(gguf)!r}))
    """)
    assert subprocess.run([sys.executable, "-c", killed]).returncode == -9
    (leftover,) = (cache / "models").iterdir()
    assert (leftover / "model.safetensors").exists()
    target = cache / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    legacy = target.with_name(f"{target.name}.tmp{2**22 + 1}")  # the earlier writer's name, a pid no one has
    legacy.mkdir()
    live = cache / "models" / f".other.json.x.tmp{os.getpid()}"  # a write still under way
    live.write_text("{")
    with caplog.at_level(logging.WARNING):
        assert models._converted_folder(gguf) == target
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted([target.name, f"{target.name}.json",
                                                                          live.name])
    assert str(leftover) in caplog.text and str(legacy) in caplog.text and len(conversions) == 1
