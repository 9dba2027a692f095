import copy
import json

import pytest
import torch
from conftest import DATA, needs_data

from retention.arch import ArchAdapter
from retention.editing import causal_trace
from retention.editing.causal_trace import (
    POSITION_GROUPS,
    LayersNotLocated,
    TraceConfig,
    best_window,
    located_layers,
    plot_trace,
    resolve_layers,
    save_located,
    trace_facts,
)
from retention.editing.trace import patch_outputs, subject_token_span
from retention.records import KnowledgeRecord
from retention.tokens import prompt_ids, target_ids

FACTS = [
    KnowledgeRecord("1", "Danielle Darrieux", "The mother tongue of {} is", "P103", "English", "French"),
    KnowledgeRecord("2", "Paris", "{} is the capital of", "P1376", "Italy", "France"),
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private folder for the located layers (the model cache stays shared: tiny models use its tokenizer)."""
    monkeypatch.setattr(causal_trace, "cache_dir", lambda: tmp_path / "cache")
    return tmp_path / "cache"


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_trace_shapes_and_restoring_the_last_layer_recovers_the_clean_run(request, which):
    model, tokenizer = request.getfixturevalue(which)
    config = TraceConfig(kinds=("hidden", "mlp", "attn"), all_positions=True, samples=1, window=2)
    result = trace_facts(model, tokenizer, FACTS, config)
    n = ArchAdapter.for_model(model).num_layers
    assert result.num_layers == n and len(result.facts) == 2 and result.noise_std > 0
    for fact in result.facts:
        assert set(fact.effects) == {"hidden", "mlp", "attn"}
        assert set(fact.effects["hidden"]) <= set(POSITION_GROUPS)
        assert all(len(p) == n for groups in fact.effects.values() for p in groups.values())
        # The last position's output of the last layer is all the next-token prediction reads.
        assert fact.effects["hidden"]["last"][-1] == pytest.approx(fact.p_clean, rel=1e-4)
        assert fact.p_corrupted != fact.p_clean
    # "Danielle Darrieux" has a middle token; "Paris" (one token, first in the prompt) has none.
    assert "middle_subject" in result.facts[0].effects["hidden"]
    assert "middle_subject" not in result.facts[1].effects["hidden"]
    assert len(result.aie("mlp")) == n and len(result.aie("hidden", "middle_subject")) == n
    summary = result.to_dict(k=1)
    assert summary["located"]["layers"] == result.located(1)
    json.dumps(summary)


def test_batched_restorations_equal_one_plain_forward_per_restoration(tiny_llama):
    """The cached-prefix batches give what a full corrupted forward with one restoration gives (float64 model;
    the probabilities themselves are float32)."""
    model, tokenizer = tiny_llama
    model = copy.deepcopy(model).double()
    fact = FACTS[0]
    config = TraceConfig(kinds=("hidden", "mlp"), samples=1, window=1, rows_per_batch=3, seed=7)
    result = trace_facts(model, tokenizer, [fact], config)
    adapter = ArchAdapter.for_model(model)
    first, last = subject_token_span(tokenizer, fact.prompt, fact.subject)
    noise = torch.randn((last - first + 1, adapter.hidden_size), generator=torch.Generator().manual_seed(7))
    noise = (noise * result.noise_std).double()
    ids = torch.tensor([prompt_ids(tokenizer, fact.rewrite_prompt)])
    target = target_ids(tokenizer, fact.target_true)[0]

    def corrupt(y):
        y = y.clone()
        y[:, first : last + 1] += noise
        return y

    def prob(patches):
        with torch.no_grad(), patch_outputs(patches):
            return torch.softmax(model(input_ids=ids).logits[0, -1], -1)[target].item()

    clean = {}
    for kind, module in [("hidden", adapter.layer(0)), ("mlp", adapter.mlp(1))]:
        with torch.no_grad(), patch_outputs({module: lambda y, k=kind: clean.setdefault(k, y.clone())}):
            model(input_ids=ids)

    def restore(k):
        return lambda y: torch.cat([y[:, :last], clean[k][:, last : last + 1], y[:, last + 1 :]], 1)

    fact_trace = result.facts[0]
    assert fact_trace.p_corrupted == pytest.approx(prob({adapter.embed: corrupt}), rel=1e-5)
    restored_h0 = prob({adapter.embed: corrupt, adapter.layer(0): restore("hidden")})
    assert fact_trace.effects["hidden"]["last_subject"][0] == pytest.approx(restored_h0, rel=1e-5)
    restored_m1 = prob({adapter.embed: corrupt, adapter.mlp(1): restore("mlp")})
    assert fact_trace.effects["mlp"]["last_subject"][1] == pytest.approx(restored_m1, rel=1e-5)


def test_best_window():
    assert best_window([0, 1, 5, 4, 0, 3], 2) == [2, 3]
    assert best_window([1, 1, 1], 1) == [0]
    with pytest.raises(ValueError, match="k=4"):
        best_window([1, 2, 3], 4)


def test_located_layers_round_trip_and_a_clear_error_when_absent(tiny_llama, cache):
    model, _ = tiny_llama
    with pytest.raises(LayersNotLocated, match="retention locate"):
        located_layers(model)
    with pytest.raises(LayersNotLocated, match="retention locate"):
        resolve_layers("located", model)
    path = save_located(model, [1], {"k": 1})
    assert path.parent == cache / "located"
    assert located_layers(model) == [1] and resolve_layers("located", model) == [1]
    path.write_text("{}")
    with pytest.raises(LayersNotLocated, match="rerun"):
        located_layers(model)


def test_resolve_layers(tiny_llama):
    model, _ = tiny_llama
    assert resolve_layers([0, -1], model) == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([2], model)
    with pytest.raises(ValueError, match="located"):
        resolve_layers("best", model)


def test_plot_writes_a_png(tiny_gpt2, tmp_path):
    model, tokenizer = tiny_gpt2
    result = trace_facts(model, tokenizer, FACTS[:1], TraceConfig(samples=1))
    path = plot_trace(result, tmp_path / "trace.png", k=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_errors():
    with pytest.raises(ValueError, match="kinds"):
        TraceConfig(kinds=("mlp", "resid"))
    with pytest.raises(ValueError, match="window"):
        TraceConfig(window=0)


def test_locate_command_writes_json_png_and_stores_the_layers(tiny_llama, cache, tmp_path, capsys):
    from retention.commands.locate import main

    data = tmp_path / "facts.json"
    data.write_text(json.dumps([r.to_dict() for r in FACTS]))
    out = tmp_path / "out"
    assert main(["--model", "tiny-llama", "--data", str(data), "--n", "2", "--known", "none", "--k", "1",
                 "--samples", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "causal_trace.json").read_text())
    assert summary["n_facts"] == 2 and len(summary["aie"]["mlp"]["last_subject"]) == 2
    assert (out / "causal_trace.png").stat().st_size > 0
    assert located_layers(tiny_llama[0]) == summary["located"]["layers"]
    assert "located MLP layers" in capsys.readouterr().out


@needs_data
@pytest.mark.slow
def test_real_model_recall_is_destroyed_by_the_noise_and_restored_by_the_subject_states(real_model):
    from retention.data.readers import read_records

    model, tokenizer = real_model
    records, _ = read_records(DATA / "counterfact" / "counterfact_preknown.json", limit=2)
    result = trace_facts(model, tokenizer, records, TraceConfig(samples=1, kinds=("hidden",)))
    for fact in result.facts:
        assert fact.p_corrupted < 0.5 * fact.p_clean
    aie = result.aie("hidden")
    # Restoring the subject's last token helps in the early-middle layers, not after the last attention read.
    assert max(aie[:20]) > 0.1 * sum(f.p_clean - f.p_corrupted for f in result.facts) / len(result.facts)
    assert abs(aie[-1]) < 1e-6
