"""bf16 on the CPU: float32 vs autocast to bfloat16, side by side in one run on the default model (SmolLM2-135M).

- Training: full fine-tuning (``FineTuneModule`` under ``Trainer.fit``), a fixed batch of 4 x 64 tokens,
  ``trainer.precision`` ``32-true`` vs ``bf16-mixed``; each timed run is a fresh fit of ``STEPS`` steps.
- Scoring: a seeded sample of CounterFact probes under ``top1`` and ``prob``, ``precision`` ``32`` vs ``bf16``
  (``monitor.precision``).
- Agreement: the share of probes whose pass/fail differs from float32, per protocol, under autocast and with the
  weights themselves in bfloat16 (``retention probe --dtype bfloat16``).

The runs are interleaved, median of ``REPEATS`` each (after a warm-up of each). Where the CPU lacks AVX-512 BF16
and AMX, bf16 is emulated: the run measures it anyway and says so.
"""

from __future__ import annotations

import logging
import random
from unittest import mock

import torch

from bench.bench_scoring import DATA
from bench.bench_train import fit_steps, random_batch
from bench.common import interleaved_medians
from retention.data.readers import load_records
from retention.models import load_model
from retention.modules.finetune import FineTuneModule, OptimizerArgs
from retention.scoring import bf16_supported, score_probes

BATCH, LENGTH, STEPS = 4, 64, 4
SAMPLE, SCORE_BATCH = 200, 32
PROTOCOLS = ("top1", "prob")
REPEATS = 3


def _differ(a, b, protocol: str) -> float:
    return sum(x.passed[protocol] != y.passed[protocol] for x, y in zip(a, b)) / len(a)


def run() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    native = bf16_supported("cpu")
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 (AVX-512 BF16 or AMX): "
          f"{'yes' if native else 'no: bf16 is emulated here'}; {torch.get_num_threads()} threads")
    model, tok = load_model("smollm2-135m")
    records = load_records(DATA)
    probes = random.Random(0).sample([p for r in records for p in r.edit_probes()], SAMPLE)

    out = {}

    def scorer(precision: str):
        def score() -> None:
            out[precision] = score_probes(model, tok, probes, PROTOCOLS, batch_size=SCORE_BATCH, precision=precision)
        return score

    # Measured where bf16 is emulated too (monitor.precision refuses it there): what it would cost is the question.
    with mock.patch("retention.scoring.bf16_supported", return_value=True):
        score_med = interleaved_medians({"32": scorer("32"), "bf16": scorer("bf16")}, repeats=REPEATS)
    weights_bf16, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    out["dtype"] = score_probes(weights_bf16, tok, probes, PROTOCOLS, batch_size=SCORE_BATCH)
    del weights_bf16
    print(f"medians of {REPEATS} interleaved runs after a warm-up of each")
    print(f"{'':<22}{'float32':>12}{'bf16':>12}{'bf16/fp32':>11}")
    score = [SAMPLE / score_med[p] for p in ("32", "bf16")]
    print(f"{'scoring probes/s':<22}{score[0]:>12.1f}{score[1]:>12.1f}{score[1] / score[0]:>10.2f}x"
          f"   ({SAMPLE} CounterFact probes, {'+'.join(PROTOCOLS)}, batch {SCORE_BATCH})", flush=True)
    print(f"\nprobes whose pass/fail differs from float32 (of {SAMPLE}):")
    for name, key in (("bf16 autocast (monitor.precision bf16)", "bf16"), ("bf16 weights (probe --dtype bfloat16)",
                                                                           "dtype")):
        cells = ", ".join(f"{p} {_differ(out['32'], out[key], p):.1%}" for p in PROTOCOLS)
        drift = max(abs(a.target_logprob - b.target_logprob) for a, b in zip(out["32"], out[key]))
        print(f"  {name:<40} {cells}; max |Δ target log-prob| {drift:.3f}")

    batch = random_batch(model.config.vocab_size, BATCH, LENGTH)
    module = FineTuneModule.from_model(model, tok, optimizer=OptimizerArgs(lr=1e-5, schedule="constant"))
    module.configure_model()
    train_med = interleaved_medians({p: (lambda p=p: fit_steps(module, batch, STEPS, p))
                                     for p in ("32-true", "bf16-mixed")}, repeats=REPEATS)
    train = [BATCH * LENGTH * STEPS / train_med[p] for p in ("32-true", "bf16-mixed")]
    print(f"{'training tokens/s':<22}{train[0]:>12.1f}{train[1]:>12.1f}{train[1] / train[0]:>10.2f}x"
          f"   ({STEPS} steps of {BATCH}x{LENGTH} tokens per run, full fine-tuning)")
