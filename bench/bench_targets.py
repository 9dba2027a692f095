"""Batched target optimisation (MEMIT's z-vectors) vs one fact at a time, on the default model.

32 CounterFact facts, the smollm2-135m MEMIT preset (its z layer, learning rate and context templates; 10 steps to
keep the section short on a CPU): one :func:`optimise_targets` call for all 32 facts against 32 calls of
one fact each, run side by side; the vectors must agree (max relative difference of δ over the facts).
"""

from __future__ import annotations

from dataclasses import replace

from bench.common import interleaved_medians
from retention.data.readers import load_records
from retention.editing.base import EditRequest
from retention.editing.causal_trace import resolve_layers
from retention.editing.locate_then_edit import context_templates
from retention.editing.memit import MemitHParams
from retention.editing.registry import build_editor
from retention.editing.targets import optimise_targets
from retention.models import load_model, model_fingerprint

DATA = "../shared/data/counterfact/counterfact_preknown.json"
N_FACTS = 32
STEPS = 10
REPEATS = 3


def run() -> None:
    model, tok = load_model("smollm2-135m")
    hp: MemitHParams = build_editor("memit", None, "smollm2-135m").hparams
    fixed, layer = replace(hp, v_steps=STEPS), max(resolve_layers(hp.layers, model))
    templates = context_templates(model, tok, hp.context_templates, hp.context_seed, model_fingerprint(model))
    requests = [EditRequest.from_record(r) for r in load_records(DATA, limit=N_FACTS)]
    print(f"{N_FACTS} facts, z at layer {layer}, {fixed.v_steps} steps at most, {len(templates)} context templates, "
          f"median of {REPEATS} interleaved runs")

    out = {}

    def batched():
        out["batched"] = optimise_targets(model, tok, requests, templates, fixed, layer, "layer")

    def one_at_a_time():
        out["alone"] = [optimise_targets(model, tok, [r], templates, fixed, layer, "layer")[0] for r in requests]

    med = interleaved_medians({"batched": batched, "one at a time": one_at_a_time}, repeats=REPEATS)
    together, alone = out["batched"], out["alone"]
    rel = max(((a.delta - b.delta).norm() / b.delta.norm()).item() for a, b in zip(together, alone))
    print(f"same vectors: max relative difference of δ over the facts {rel:.2e}; Adam steps "
          f"{sum(t.steps for t in together)} batched, {sum(t.steps for t in alone)} one at a time")
    for name, t in med.items():
        print(f"{name:>14}: {t:7.1f} s ({N_FACTS / t:.2f} facts/s)")
    print(f"speed-up batched / one at a time: {med['one at a time'] / med['batched']:.2f}x")
