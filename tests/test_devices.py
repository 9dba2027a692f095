"""Devices and dtypes: ``--device auto``, dtype names, and editors whose statistics and solves stay in float32 or
wider when the model is in bfloat16."""

import random

import pytest
import torch
from editing_models import FACT, UNRELATED, edit_model, rewrite_probe, same_state, state

from retention.editing.rome import RomeEditor, RomeHParams
from retention.models import load_model, resolve_device, resolve_dtype
from retention.scoring import score_probes


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda': no CUDA GPU is visible"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2': this machine has 2 CUDA GPU\(s\)"):
        resolve_device("cuda:2")


def test_resolve_dtype():
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype(torch.float16, "cpu") is torch.float16
    with pytest.raises(ValueError, match="dtype 'float64'"):
        resolve_dtype("float64", "cpu")


def test_load_model_by_dtype_name():
    model, _ = load_model("tiny-gpt2", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_rome_in_bfloat16_lands_with_float64_statistics_and_solve(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    words = "the of and a in to was is for on as by with he she it from at his her an which that were".split()
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)))
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer)).to(torch.bfloat16)
    saved = state(model)
    # The covariance C (its LU factors) and the key k of the solve u = C⁻¹k, whatever code path computes them.
    seen: dict[str, list[torch.dtype]] = {"cov": [], "solve": []}
    lu_factor, lu_solve = torch.linalg.lu_factor, torch.linalg.lu_solve

    def factor(a, *args, **kw):
        seen["cov"].append(a.dtype)
        return lu_factor(a, *args, **kw)

    def solve(lu, pivots, b, *args, **kw):
        seen["solve"] += [lu.dtype, b.dtype]
        return lu_solve(lu, pivots, b, *args, **kw)

    monkeypatch.setattr(torch.linalg, "lu_factor", factor)
    monkeypatch.setattr(torch.linalg, "lu_solve", solve)

    probe = rewrite_probe(FACT)
    assert not score_probes(model, tokenizer, [probe])[0].passed["top1"]
    hp = RomeHParams(layer=0, context_templates=[[5, 3]], v_weight_decay=0.0, clamp_norm_factor=1e4,
                     mom2_corpus=str(corpus), mom2_samples=200, mom2_max_length=32)
    result = RomeEditor(hp).edit(model, tokenizer, [FACT])
    assert seen == {"cov": [torch.float64], "solve": [torch.float64, torch.float64]}
    (name, delta), = result.deltas.items()
    assert delta.dtype == torch.float32 and torch.isfinite(delta).all()

    result.apply(model)
    assert model.get_parameter(name).dtype == torch.bfloat16
    assert score_probes(model, tokenizer, [probe])[0].passed["top1"]
    ids = tokenizer(UNRELATED, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    result.revert(model)
    assert same_state(model, saved)
