"""Fine-tuning throughput of 2 CPU ranks (DDP, and FSDP2 when its trainer config exists) against 1 rank.

Each run is a whole ``retention fit`` subprocess: the default SmolLM2-135M, full fine-tuning on the built-in
prose (128-token blocks, batch 4 per rank), ``STEPS`` steps, no edits, no validation, no checkpoint. The
throughput is the trained tokens of all ranks over the fit time rank 0 reports (model loading and process
start excluded). 1 rank runs with 2 threads, 2 ranks with 1 thread each: both use the machine's 2 cores, so on
this CPU the ratio measures the overhead of gradient all-reduce (DDP) or of all-gathering every layer's weights
and reduce-scattering its gradients (FSDP2), not a speed-up. Runs are interleaved; medians of ``REPEATS``.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS, REPEATS = 8, 2
ROOT = Path(__file__).resolve().parents[1]
_REPORT = re.compile(r"(\d+) steps, (\d+) trained tokens in ([\d.]+) s")


def _fit(out: Path, name: str, threads: int, world: int, extra: list[str]) -> float:
    """Tokens per second over all ranks of one ``retention fit`` run."""
    argv = [sys.executable, "-m", "retention", "fit", "--config", str(ROOT / "configs/fit/text_builtin.yaml"),
            *extra, "--data.task.block_size", "128", "--data.batch_size", "4", "--trainer.max_steps", str(STEPS),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--run.validate_first", "false", "--run.checkpoint_every", "0", "--run.wandb", "disabled",
            "--run.out_dir", str(out), "--run.name", name, "--run.overwrite", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    match = _REPORT.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return world * int(match.group(2)) / float(match.group(3))


def run() -> None:
    setups = {"1 rank (2 threads)": (2, 1, ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]),
              "DDP, 2 ranks (1 thread each)": (1, 2, ["--config", str(ROOT / "configs/trainer/ddp_cpu.yaml")])}
    fsdp2 = ROOT / "configs/trainer/fsdp2_cpu.yaml"
    if fsdp2.is_file():
        setups["FSDP2, 2 ranks (1 thread each)"] = (1, 2, ["--config", str(fsdp2)])
    else:
        print(f"(FSDP2 left out: {fsdp2.relative_to(ROOT)} does not exist)")
    print(f"full fine-tuning of smollm2-135m, 4 x 128 tokens per rank and step, {STEPS} steps per run, median of "
          f"{REPEATS} interleaved runs")
    rates: dict[str, list[float]] = {k: [] for k in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(REPEATS):
            for label, (threads, world, extra) in setups.items():
                rates[label].append(_fit(Path(tmp), f"run{i}", threads, world, extra))
    base = statistics.median(rates["1 rank (2 threads)"])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"{label:>32}: {rate:7.1f} tokens/s  ({rate / base:.2f}x 1 rank)")
