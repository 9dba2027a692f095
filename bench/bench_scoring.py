"""Scoring throughput: the batched scorer vs a per-probe loop (one forward per prompt–target pair).

Probes: a seeded sample of the rewrite, paraphrase and neighbourhood prompts of the 1,093 CounterFact records,
scored under ``prob`` (a target and an alternative per probe). The two scorers run interleaved, the median of
three runs each; their outcomes must agree.
"""

from __future__ import annotations

import random

import torch

from bench.common import interleaved_medians
from bench.reference import score_probes_unbatched
from retention.data.readers import load_records
from retention.models import load_model
from retention.scoring import score_probes

DATA = "../shared/data/counterfact/counterfact_preknown.json"
SAMPLE = 200
BATCH = 32


def run() -> None:
    model, tok = load_model("smollm2-135m")
    records = load_records(DATA)
    probes = [p for r in records for p in r.edit_probes()]
    sample = random.Random(0).sample(probes, SAMPLE)
    print(f"{len(records)} records, {len(probes)} probes (rewrite+paraphrase+neighbourhood); seeded sample of "
          f"{SAMPLE}, batch {BATCH}, {torch.get_num_threads()} threads")
    out = {}
    medians = interleaved_medians({
        "batched": lambda: out.__setitem__("batched", score_probes(model, tok, sample, ("prob",), batch_size=BATCH)),
        "per-probe loop": lambda: out.__setitem__("loop", score_probes_unbatched(model, tok, sample, ("prob",))),
    })
    agree = sum(a.passed == b.passed for a, b in zip(out["batched"], out["loop"]))
    diff = max(abs(a.target_logprob - b.target_logprob) for a, b in zip(out["batched"], out["loop"]))
    print(f"outcomes agree on {agree}/{SAMPLE} probes; max |Δ log-prob| {diff:.1e}")
    for name, t in medians.items():
        print(f"{name:>15}: median {t:.2f} s, {SAMPLE / t:8.1f} probes/s")
    print(f"speed-up batched / per-probe: {medians['per-probe loop'] / medians['batched']:.2f}x")
