"""The t=0 measurement shared between runs of the same edited model (retention.callbacks.t0_cache): a reused t=0
is the measurement itself, probe for probe; another edit, other probes or other settings measure again; a
damaged entry is measured again."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from retention.callbacks import t0_cache
from retention.callbacks.apply_edits import ApplyEdits
from retention.callbacks.probing import ScoreSettings, measure
from retention.diskcache import DiskCache, digest
from retention.paths import cache_dir
from retention.pipeline_contract import PipelineState

SETTINGS = ScoreSettings(("top1", "prob", "token_acc", "gen"), 4, 3)
EDIT = {"base_fingerprint": "f00", "editor": "rome", "hparams": {"layer": 1}, "mode": "batch",
        "reused": {"edit": False}, "edit_diagnostics": [{"seconds": 1.0}]}


@pytest.fixture
def cache(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def probes():
    return ApplyEdits(known_protocol="none", n_edit=2, n_control=2).select(pl_module=None).sets.probes()


@pytest.fixture
def model(tiny_llama):
    return copy.deepcopy(tiny_llama[0])


def _state(**changes) -> PipelineState:
    return PipelineState(edit={**EDIT, **changes}, edited_layers=[1])


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (recursively through dicts, lists and dataclasses)."""
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def test_a_reused_t0_is_the_measurement_probe_for_probe(cache, model, tiny_llama, probes, monkeypatch):
    tokenizer = tiny_llama[1]
    probes = [*probes, dataclasses.replace(probes[0], alternative=None, case_id="no alternative")]
    fresh, fresh_local = measure(model, tokenizer, probes, SETTINGS, 0)
    assert math.isnan(fresh_local[-1].alt_logprob)  # stored and read back as NaN
    first_state, state = _state(), _state(reused={"edit": True}, edit_diagnostics=[{"seconds": 0.1}])
    t0_cache.measure_t0(model, tokenizer, probes, SETTINGS, first_state)
    assert first_state.stats["t0_reused"] == 0

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored although the t=0 of this edited model is cached")

    monkeypatch.setattr(t0_cache, "measure", no_scoring)
    m, local = t0_cache.measure_t0(model, tokenizer, probes, SETTINGS, state)
    assert state.stats["t0_reused"] == 1
    assert m.step == 0 and _same(m.rates, fresh.rates)
    assert _same(local, fresh_local) and _same(m.results, fresh.results)
    assert [r.probe for r in local] == probes


def test_another_edit_probes_or_settings_have_another_key(model, tiny_llama, probes):
    def key(probes=probes, settings=SETTINGS, **edit):
        return t0_cache.t0_key(model, tiny_llama[1], probes, settings, _state(**edit))

    same = key()
    assert key(reused={"edit": True}, edit_diagnostics=[]) == same  # how the edit was come by is no part of it
    others = [key(probes=probes[:-1]), key(settings=ScoreSettings(("top1", "prob"), 4, 3)),
              key(settings=dataclasses.replace(SETTINGS, batch_size=2)),
              key(settings=dataclasses.replace(SETTINGS, max_new_tokens=4)),
              key(hparams={"layer": 0}), key(base_fingerprint="ba5e"), key(precomputed="elsewhere")]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # another edit of the edited layer
        others.append(key())
        model.model.embed_tokens.weight[0, 0] += 1e-3  # and outside the decoder layers
        others.append(key())
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3  # a layer the edit did not touch: not hashed
        assert key() == others[-1]
    assert same not in others and len({digest(k) for k in others}) == len(others)


def test_one_process_with_several_ranks_does_not_share(cache, model, tiny_llama, probes, monkeypatch):
    monkeypatch.setattr(t0_cache, "rank_and_world", lambda: (0, 2))
    assert t0_cache.t0_key(model, tiny_llama[1], probes, SETTINGS, _state()) is None
    assert t0_cache.t0_key(model, tiny_llama[1], probes, SETTINGS, PipelineState()) is None


@pytest.mark.parametrize("damage", ["garbage", "wrong results"])
def test_a_damaged_entry_is_measured_again(cache, model, tiny_llama, probes, damage, caplog):
    tokenizer = tiny_llama[1]
    fresh, fresh_local = t0_cache.measure_t0(model, tokenizer, probes, SETTINGS, _state())
    key = t0_cache.t0_key(model, tokenizer, probes, SETTINGS, _state())
    store = DiskCache(cache_dir() / "t0")
    if damage == "garbage":
        store.data_path(key, ".json").write_text("{not json")
    else:  # a sound record whose payload does not fit the probes
        payload = store.get(key)[0]
        store.put(key, {**payload, "results": payload["results"][:-1]})
    state = _state()
    m, local = t0_cache.measure_t0(model, tokenizer, probes, SETTINGS, state)
    assert state.stats["t0_reused"] == 0 and "ignored" in caplog.text
    assert _same(m.rates, fresh.rates) and _same(local, fresh_local)
    again = _state()
    t0_cache.measure_t0(model, tokenizer, probes, SETTINGS, again)
    assert again.stats["t0_reused"] == 1  # measured and stored anew
