"""The single protocol's edits optimised together: ``Editor.edit_singles`` of ROME, MEMIT and AlphaEdit gives the
updates that editing each request alone gives (within float rounding: the batched optimisation pads and chunks
its prompt rows differently), leaves the model as it was and names a refused request; a single-protocol run
edits its seed's facts once and the seed's other runs read theirs from the edit cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from editing_models import edit_model, same_state, state
from memit_cases import REQUESTS, tiny_hparams, write_corpus
from tiny_runs import fit_config, prepare

from retention.editing import memit, rome
from retention.editing.alphaedit import AlphaEditEditor, AlphaEditHParams
from retention.editing.base import EditError, run_edits
from retention.editing.memit import MemitEditor, MemitHParams
from retention.editing.rome import RomeEditor, RomeHParams

TOLERANCE = 1e-4
"""Largest |Δ| allowed between a batched and a one-by-one delta, relative to the largest entry of the delta:
float32 rounding of differently padded forwards, amplified by 15 Adam steps (measured about 1e-6)."""


def _editors(corpus: Path) -> dict:
    """ROME without key statistics (C = I); MEMIT with 200 corpus samples (a rank-deficient C would make its solve
    amplify rounding); AlphaEdit with 32 corpus tokens, so its null space is most of the key space."""
    hp = tiny_hparams(corpus, v_steps=15)
    rome_hp = {k: v for k, v in hp.items() if k != "layers"} | {"mom2_adjustment": False}
    alpha_hp = hp | {"mom2_samples": 2, "mom2_max_length": 16}
    return {
        "rome": lambda: RomeEditor(RomeHParams(layer=0, **rome_hp)),
        "memit": lambda: MemitEditor(MemitHParams(**hp, mom2_update_weight=10.0)),
        "alphaedit": lambda: AlphaEditEditor(AlphaEditHParams(**alpha_hp, nullspace_threshold=1e-6,
                                                              relative_threshold=True)),
    }


@pytest.fixture
def corpus(tmp_path, tiny_llama, monkeypatch) -> Path:
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path)


@pytest.mark.parametrize("name", ["rome", "memit", "alphaedit"])
def test_edit_singles_equals_editing_one_by_one(tiny_llama, corpus, name):
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    saved = state(model)
    requests = REQUESTS[:3]
    make = _editors(corpus)[name]
    alone = [make().edit(model, tokenizer, [r]) for r in requests]
    batched = make().edit_singles(model, tokenizer, requests)
    assert same_state(model, saved)
    assert [r.case_ids for r in batched] == [[r.case_id] for r in requests]
    worst = 0.0
    for a, b in zip(alone, batched):
        assert sorted(a.deltas) == sorted(b.deltas) and a.layers == b.layers
        for param, delta in a.deltas.items():
            scale = delta.abs().max().item()
            assert scale > 0
            worst = max(worst, (b.deltas[param] - delta).abs().max().item() / scale)
        assert b.diagnostics[0].values["steps"] == a.diagnostics[0].values["steps"]
        assert b.diagnostics[0].seconds > 0 and b.seconds == pytest.approx(b.diagnostics[0].seconds)
    print(f"{name}: max |Δ| relative to the delta's largest entry {worst:.2e}")
    assert worst < TOLERANCE
    # run_edits' single mode uses it: one checked, unapplied result per request.
    results = run_edits(make(), model, tokenizer, requests, "single")
    assert same_state(model, saved) and len(results) == 3
    assert all(r.diagnostics[0].relative_update > 0 and not r.applied for r in results)


@pytest.mark.parametrize("name", ["rome", "memit", "alphaedit"])
def test_a_refused_request_of_the_batch_is_named(tiny_llama, corpus, name, monkeypatch):
    """The second request's target is zeroed (as a v_lr that overflows leaves it): its zero update is refused and
    the error names that request, not the first."""
    module = rome if name == "rome" else memit
    optimise = module.optimise_targets

    def zero_second(*args, **kwargs):
        targets = optimise(*args, **kwargs)
        targets[1].delta.zero_()
        return targets

    monkeypatch.setattr(module, "optimise_targets", zero_second)
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    saved = state(model)
    second = REQUESTS[1]
    with pytest.raises(EditError, match=rf"^edit request {second.case_id} \({second.rewrite_prompt!r}.*is zero"):
        _editors(corpus)[name]().edit_singles(model, tokenizer, REQUESTS[:3])
    assert same_state(model, saved)


# -- the single protocol's runs share their seed's batch through the edit cache ----------------------------------


def _fit(root: Path, name: str, index: int, cache: bool) -> dict:
    from retention.commands.fit import main as fit_main

    config = fit_config(root, name, protocols=["prob"])
    config["edits"].update({"mode": "single", "single_index": index, "cache": cache})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert fit_main(["--config", str(path), "--monitor.share_t0", "false"]) == 0
    return json.loads((root / "runs" / name / "summary.json").read_text())


def test_the_first_single_run_of_a_seed_edits_all_its_facts_and_the_others_reuse_them(tmp_path, tiny_llama,
                                                                                       monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    prepare(tmp_path, tiny_llama[1])
    runs = [_fit(tmp_path, f"fact{i}", i, cache=True) for i in range(3)]
    assert [r["run"]["reused"]["edit"] for r in runs] == [False, True, True]
    entries = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "edits").glob("*.json")]
    keys = [e["key"] for e in entries if "requests" in e["key"]]
    assert len(keys) == 3 and len({k["batched_over"] for k in keys}) == 1
    # Editing fact 1 alone (no cache: batched with nothing) gives the same numbers within float rounding.
    fresh = _fit(tmp_path, "alone1", 1, cache=False)
    assert fresh["run"]["reused"]["edit"] is False
    _close(runs[1]["t0"], fresh["t0"])
    _close(runs[1]["retention"], fresh["retention"])
    ours = runs[1]["run"]["edit_diagnostics"][0]
    theirs = fresh["run"]["edit_diagnostics"][0]
    assert ours["case_id"] == theirs["case_id"] and ours["steps"] == theirs["steps"]
    assert ours["delta_norm"] == pytest.approx(theirs["delta_norm"], rel=TOLERANCE)


def _close(a, b) -> None:
    """``a`` and ``b`` equal, numbers within TOLERANCE."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=TOLERANCE, abs=TOLERANCE, nan_ok=True)
    else:
        assert a == b
