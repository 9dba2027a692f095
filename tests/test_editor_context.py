"""The editor context (issue 14): one editor call unwraps the model, builds its adapter and fingerprints its
weights once — ROME, MEMIT and AlphaEdit share one ``prepare`` — and the helpers it calls take the context."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from editing_models import FACT, OTHER, edit_model
from memit_cases import REQUESTS, tiny_hparams, write_corpus

from bench.reference import average_key
from retention import models
from retention.arch import ArchAdapter
from retention.editing.alphaedit import AlphaEditEditor, AlphaEditHParams
from retention.editing.base import EditRequest, run_edits
from retention.editing.causal_trace import save_located
from retention.editing.context import EditorContext
from retention.editing.memit import MemitEditor, MemitHParams, keys_and_values
from retention.editing.rome import RomeEditor, RomeHParams


@pytest.fixture
def corpus(tmp_path, tiny_llama, monkeypatch) -> Path:
    """The key-statistics corpus and a private cache folder (covariances, templates, located layers)."""
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path)


@pytest.fixture
def fingerprints(monkeypatch) -> list:
    """The models :func:`retention.models.model_fingerprint` hashes, wherever the project calls it from."""
    calls = []
    original = models.model_fingerprint

    def counted(model):
        calls.append(model)
        return original(model)

    for name, module in list(sys.modules.items()):
        if name.startswith("retention") and getattr(module, "model_fingerprint", None) is original:
            monkeypatch.setattr(module, "model_fingerprint", counted)
    return calls


def _small(corpus: Path, **kw) -> dict:
    return tiny_hparams(corpus, **{"v_steps": 3, "mom2_samples": 20, **kw})


EDITORS = {
    "rome": lambda corpus: RomeEditor(RomeHParams(**{
        "layer": 0, "context_templates": [[3, 1]], "v_steps": 3, "v_weight_decay": 0.0, "clamp_norm_factor": 1e4,
        "mom2_corpus": str(corpus), "mom2_samples": 20, "mom2_max_length": 32})),
    "memit": lambda corpus: MemitEditor(MemitHParams(**_small(corpus, layers="located", mom2_update_weight=10.0))),
    # A wide relative threshold: on a random tiny model the default leaves no null space, and a zero update is refused.
    "alphaedit": lambda corpus: AlphaEditEditor(AlphaEditHParams(**_small(corpus, layers="located"),
                                                                 nullspace_threshold=0.5, relative_threshold=True)),
}


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_one_editor_call_fingerprints_the_model_once(tiny_llama, corpus, fingerprints, name):
    """Located layers, context templates and key covariances (all cached under the fingerprint) come from one
    hash of the weights; later calls on the same model reuse the set-up and hash nothing."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    save_located(model, [0, 1])
    fingerprints.clear()
    editor = EDITORS[name](corpus)
    editor.edit(model, tokenizer, [FACT])
    assert len(fingerprints) == 1 and fingerprints[0] is model
    context = editor.context
    assert context.model is model and context.layers == ([0] if name == "rome" else [0, 1])
    assert context.templates[0] == "{}" and len(context.templates) == 2 and sorted(context.covs) == context.layers
    # Sequential editing: the set-up of the unedited model stays, nothing is hashed again.
    run_edits(editor, model, tokenizer, [OTHER, REQUESTS[2]], "sequential")
    assert len(fingerprints) == 1 and editor.context is context
    # Another model gets its own set-up and one hash.
    other = edit_model("llama", len(tokenizer))
    save_located(other, [0, 1])
    fingerprints.clear()
    editor.edit(other, tokenizer, [FACT])
    assert len(fingerprints) == 1 and editor.context is not context and editor.context.model is other


def test_the_context_hashes_lazily_and_once(tiny_llama, fingerprints):
    model, tokenizer = tiny_llama
    context = EditorContext(model, tokenizer)
    assert not fingerprints and context.adapter.model is model and context.device == model.device
    assert context.fingerprint == context.fingerprint and len(fingerprints) == 1
    assert context.fingerprint == models.model_fingerprint(model)
    assert EditorContext.of(context, tokenizer) is context and EditorContext.of(model, tokenizer) is not context


def test_the_rome_key_is_the_request_column_of_keys_and_values(tiny_llama):
    """``k̄`` over all rewriting prompts is the mean of the per-phrasing keys MEMIT uses (each phrasing has the
    same number of context templates)."""
    model, tokenizer = tiny_llama
    request = EditRequest("1", FACT.subject, FACT.prompt, FACT.target_new,
                          augmentations=("{} was raised speaking", "{}'s first language is"))
    templates = ["{}", "Hello. {}", "A b c. {}"]
    k = average_key(model, tokenizer, 0, request, templates)
    per_phrasing, _ = keys_and_values(model, tokenizer, [request], templates, 0, 1)
    assert k.dtype == torch.float64 and k.shape == (per_phrasing.shape[1],)
    torch.testing.assert_close(k, per_phrasing.mean(0), rtol=1e-6, atol=1e-9)
    per_request, values = keys_and_values(model, tokenizer, [request, OTHER], templates, 0, per="request",
                                          batch_size=4)
    assert values is None and per_request.shape[0] == 2
    torch.testing.assert_close(per_request[0], k, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mlp_out_delta_is_in_the_weights_layout(tiny_llama, kind):
    model = edit_model(kind, len(tiny_llama[1]))
    adapter = ArchAdapter.for_model(model)
    weight = adapter.mlp_out_weight(1)
    update = torch.randn(adapter.hidden_size, adapter.key_size(1), dtype=torch.float64)
    name, delta = adapter.mlp_out_delta(1, update)
    assert model.get_parameter(name) is weight and delta.shape == weight.shape and delta.dtype == torch.float32
    assert torch.equal(adapter.weight_to_out_in(delta), update.float())


def test_a_caller_that_hashed_the_weights_already_passes_its_fingerprint(tiny_llama, corpus, fingerprints):
    """ApplyEdits and `retention edit` fingerprint the unedited model for their own caches and hand the hash to
    the editor's set-up: a whole run hashes the weights once."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    save_located(model, [0, 1])
    fingerprint = models.model_fingerprint(model)
    fingerprints.clear()
    editor = EDITORS["memit"](corpus)
    editor.prepare(model, tokenizer, fingerprint)
    editor.edit(model, tokenizer, [FACT])
    assert not fingerprints and editor.context.fingerprint == fingerprint


def test_retention_edit_hashes_the_weights_once(tmp_path, tiny_llama, corpus, fingerprints, monkeypatch):
    from retention.commands.edit import EditArgs
    from retention.commands.edit import run as run_edit_command

    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    args = EditArgs(model="tiny-llama", editor="rome", hparams="tiny-llama", n=2, select_known="none",
                    out=str(tmp_path / "run"), save_model=False,
                    set={"mom2_corpus": str(corpus), "mom2_samples": 20, "v_steps": 2})
    run_edit_command(args)
    assert len(fingerprints) == 1
