from pathlib import Path

import pytest
import torch
from editing_models import edit_model, same_state, state
from memit_cases import REQUESTS, tiny_hparams, top1, write_corpus

from retention.arch import ArchAdapter
from retention.editing.alphaedit import (
    AlphaEditEditor,
    AlphaEditHParams,
    alphaedit_delta,
    null_space_basis,
    null_space_projector,
)
from retention.editing.base import PRESETS, run_edits
from retention.editing.covariance import CovarianceSpec, _windows, corpus_text
from retention.editing.trace import capture


@pytest.fixture
def corpus(tmp_path, tiny_llama, monkeypatch) -> Path:
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path)


def test_projector_is_the_orthogonal_projector_onto_the_small_eigenvalues(tmp_path, monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path))
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0]
    cov = basis @ torch.diag(torch.tensor([0.0, 1e-3, 1e-2, 0.5, 1, 2, 3, 4, 5, 10.0], dtype=torch.float64)) @ basis.T
    p, rank = null_space_projector(cov, 2e-2)
    assert rank == 3
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, p.T)
    torch.testing.assert_close(p @ basis[:, :3], basis[:, :3])
    assert (p @ basis[:, 3:]).abs().max() < 1e-10
    assert null_space_projector(cov, 0.06, relative=True)[1] == 4  # below 0.6 = 0.06 × 10
    assert len(list((tmp_path / "projectors").glob("*.safetensors"))) == 2
    for cached in (tmp_path / "projectors").glob("*.safetensors"):
        cached.write_bytes(b"garbage")
    p_again, rank_again = null_space_projector(cov, 2e-2)  # an unreadable cache file is recomputed
    assert rank_again == 3 and torch.allclose(p_again, p)


def test_the_update_leaves_keys_in_the_preserved_span_unchanged():
    torch.manual_seed(0)
    d, preserved_rank = 16, 10
    span = torch.randn(d, preserved_rank, dtype=torch.float64)
    k0 = span @ torch.randn(preserved_rank, 200, dtype=torch.float64)  # preserved keys: a 10-dim subspace
    p = null_space_basis(k0 @ k0.T / 200, 1e-8)
    p = p @ p.T
    keys, resid = torch.randn(4, d, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    delta = alphaedit_delta(keys, resid, p, torch.zeros(d, d, dtype=torch.float64), l2=1e-3)
    assert (delta @ k0).norm() < 1e-9 * delta.norm() * k0.norm()
    torch.testing.assert_close(delta @ p, delta)
    # The new keys' outputs move towards the residuals as far as the null space allows.
    assert ((keys @ delta.T) - resid).norm() < resid.norm()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_edit_leaves_the_outputs_of_preserved_keys_unchanged(tiny_llama, corpus, kind):
    """Statistics over 32 corpus tokens give C₀ of rank ≤ 32 (of 128/256 key dimensions): those keys' outputs do
    not move under AlphaEdit's update, while the same update without the projection (P = I) moves them."""
    tokenizer = tiny_llama[1]
    model = edit_model(kind, len(tokenizer))
    hp = tiny_hparams(corpus, layers=[1], mom2_samples=2, mom2_max_length=16)
    alpha = AlphaEditEditor(AlphaEditHParams(**hp, nullspace_threshold=1e-6, relative_threshold=True))
    result = alpha.edit(model, tokenizer, REQUESTS[:2])
    adapter = ArchAdapter.for_model(model)
    dim = adapter.weight_to_out_in(adapter.mlp_out_weight(1)).shape[1]
    assert dim - 32 <= result.hparams["projector_ranks"][1] < dim
    unprojected = AlphaEditEditor(AlphaEditHParams(**{**hp, "mom2_adjustment": False})).edit(model, tokenizer,
                                                                                               REQUESTS[:2])
    spec = CovarianceSpec(str(corpus), hp["mom2_samples"], hp["mom2_max_length"])
    windows = _windows(tokenizer, corpus_text(str(corpus), 0)[0], spec)  # the preserved keys' own windows
    with torch.no_grad(), capture({"k": adapter.mlp_out(1)}, outputs=False) as rec:
        model(input_ids=windows)
    k0 = rec["k"].input.reshape(-1, dim).double().T
    name = f"{adapter.mlp_out_name(1)}.weight"

    def ratio(res):
        delta = adapter.weight_to_out_in(res.deltas[name]).double()
        return ((delta @ k0).norm() / (delta.norm() * k0.norm())).item()

    assert ratio(result) < 1e-6 and ratio(unprojected) > 1e-2, (ratio(result), ratio(unprojected))
    result.apply(model)
    assert all(top1(model, tokenizer, REQUESTS[:2]))


def test_sequential_editing_keeps_the_earlier_batches(tiny_llama, corpus):
    tokenizer = tiny_llama[1]
    model = edit_model("gpt2", len(tokenizer))
    saved = state(model)
    hp = AlphaEditHParams(**tiny_hparams(corpus), nullspace_threshold=1e-2, relative_threshold=True)
    editor = AlphaEditEditor(hp)
    results = run_edits(editor, model, tokenizer, REQUESTS[:12], mode="sequential", batch_size=4)
    assert [r.hparams["earlier_requests_kept"] for r in results] == [4, 8, 12]
    assert all(top1(model, tokenizer, REQUESTS[:4]))  # the first batch survives the two after it
    assert all(top1(model, tokenizer, REQUESTS[4:12]))
    # When the model no longer holds the earlier edits (reverted), their keys are dropped.
    for r in reversed(results):
        r.revert(model)
    assert same_state(model, saved)
    again = editor.edit(model, tokenizer, REQUESTS[:2])
    assert again.hparams["earlier_requests_kept"] == 2


def test_hparams_errors_and_presets(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the large presets' hub corpus: no network check in tests
    with pytest.raises(ValueError, match="nullspace_threshold"):
        AlphaEditHParams(nullspace_threshold=0.0)
    with pytest.raises(ValueError, match="relative"):
        AlphaEditHParams(nullspace_threshold=2.0, relative_threshold=True)
    with pytest.raises(ValueError, match="l2"):
        AlphaEditHParams(l2=0.0)
    names = {p.stem for p in (PRESETS / "alphaedit").glob("*.yaml")}
    assert {"smollm2-135m", "gpt2-xl", "gpt-j-6b", "llama-3-8b"} <= names
    for preset in sorted((PRESETS / "alphaedit").glob("*.yaml")):
        AlphaEditHParams.from_yaml(preset)
