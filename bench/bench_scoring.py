"""Scoring throughput: the batched scorer vs a per-probe loop (one forward per prompt–target pair).

Probes: the rewrite, paraphrase and neighbourhood prompts of the 1,093 CounterFact records (``prob``).
The per-probe loop runs on a seeded sample of those probes (the full set would take a quarter of an hour
at its speed); the batched scorer runs on the same sample, one after the other, and then on the full set.
"""

from __future__ import annotations

import random
import time

import torch

from retention.data.readers import load_records
from retention.models import load_model
from retention.scoring import score_probes, score_probes_unbatched

DATA = "../shared/data/counterfact/counterfact_preknown.json"
SAMPLE = 300


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run() -> None:
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    records = load_records(DATA)
    probes = [p for r in records for p in r.edit_probes()]
    sample = random.Random(0).sample(probes, SAMPLE)
    print(f"{len(records)} records, {len(probes)} probes (rewrite+paraphrase+neighbourhood); sample {SAMPLE}")
    score_probes(model, tok, sample[:8], ("prob",))  # warm-up
    score_probes_unbatched(model, tok, sample[:8], ("prob",))
    batched, t_batched = _timed(lambda: score_probes(model, tok, sample, ("prob",), batch_size=32))
    loop, t_loop = _timed(lambda: score_probes_unbatched(model, tok, sample, ("prob",)))
    agree = sum(a.passed == b.passed for a, b in zip(batched, loop))
    print(f"outcomes agree on {agree}/{SAMPLE} probes")
    for name, t in (("batched", t_batched), ("per-probe loop", t_loop)):
        print(f"{name:>15}: {SAMPLE / t:8.1f} probes/s  ({t:.1f} s for {SAMPLE})")
    print(f"speed-up batched / per-probe: {t_loop / t_batched:.2f}x")
    _, t = _timed(lambda: score_probes(model, tok, probes, ("prob",), batch_size=32))
    print(f"batched on all {len(probes)} probes: {len(probes) / t:.1f} probes/s ({t:.0f} s)")
