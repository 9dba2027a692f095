"""The GPU paths in one short run (``bash bench/gpu_check.sh``; about 8 minutes on one GPU), printed as one table.

1. ``retention fit`` of the demo in bf16-mixed on one GPU, its AlphaEdit batch made on the GPU: edit seconds,
   fine-tuning tokens/s, edited and intrinsic retention under top1/prob/gen;
2. the same, shorter, under FSDP1 (``configs/trainer/fsdp_gpu.yaml``) and FSDP2 (``configs/trainer/fsdp2_gpu.yaml``)
   on one device: do they run, and their tokens/s;
3. MEMIT and AlphaEdit batches of 50 known facts of the built-in set on the GPU: seconds per edit and how many
   land under ``prob``.

Every step runs even when an earlier one fails; a failure is a table row with its reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "gpu_check"
_REPORT = re.compile(r"(\d+) steps, (\d+) trained tokens in ([\d.]+) s")


def _fit(name: str, extra: list[str], steps: int) -> dict:
    argv = [sys.executable, "-m", "retention", "fit", "--config", str(ROOT / "configs/demo.yaml"), *extra,
            "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
            "--trainer.max_steps", str(steps), "--monitor.every_n_steps", str(steps // 2),
            "--trainer.enable_progress_bar", "false", "--run.out_dir", str(OUT), "--run.name", name,
            "--run.overwrite", "true", "--run.wandb", "disabled", "--run.checkpoint_every", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    m = _REPORT.search(proc.stdout)
    out = {"wall s": f"{time.perf_counter() - t0:.0f}",
           "tokens/s": f"{int(m.group(2)) / float(m.group(3)):.0f}" if m else "?"}
    summary_path = OUT / name / "summary.json"
    if summary_path.is_file():  # runs with edits
        summary = json.loads(summary_path.read_text())
        r = summary["retention"]
        out["edit s"] = f"{summary['timings'].get('edit_s', 0):.1f}"
        out.update({p: f"E {r[p]['edit']['count']}/{r[p]['edit']['denominator']}, "
                       f"I {r[p]['control']['count']}/{r[p]['control']['denominator']}" for p in ("top1", "prob", "gen")})
    return out


def _batch_edit(editor_name: str, n: int = 50) -> dict:
    import torch

    from retention.data.readers import load_records
    from retention.data.selection import select_known_facts
    from retention.editing.base import EditRequest, run_edits
    from retention.editing.registry import build_editor
    from retention.models import load_model
    from retention.scoring import score_probes

    model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cuda")
    known = select_known_facts(model, tok, load_records("builtin"), "top1")[:n]
    editor = build_editor(editor_name, None, "smollm2-135m")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_edits(editor, model, tok, [EditRequest.from_record(r) for r in known], "batch")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    probes = [p for r in known for p in r.edit_probes() if p.kind == "rewrite"]
    landed = sum(res.passed["prob"] for res in score_probes(model, tok, probes, ("prob",)))
    return {"edits": str(len(known)), "s per edit": f"{seconds / len(known):.2f}", "landed (prob)":
            f"{landed}/{len(probes)}"}


def main() -> int:
    rows: list[tuple[str, dict]] = []
    steps = [("fit bf16-mixed, edits on the GPU", lambda: _fit("bf16", [], 120)),
             # FSDP1 runs plain fine-tuning: the RetentionMonitor refuses it (docs/finetuning.md, strategies).
             ("fit FSDP1, 1 device, no edits", lambda: _fit("fsdp1", [
                 "--config", str(ROOT / "configs/trainer/fsdp_gpu.yaml"), "--edits.n_edit", "0",
                 "--edits.n_control", "0"], 40)),
             ("fit FSDP2, 1 device", lambda: _fit("fsdp2", [
                 "--config", str(ROOT / "configs/trainer/fsdp2_gpu.yaml"),
                 "--trainer.strategy.init_args.data_parallel_size", "1"], 40)),
             ("MEMIT batch of 50", lambda: _batch_edit("memit")),
             ("AlphaEdit batch of 50", lambda: _batch_edit("alphaedit"))]
    t0 = time.perf_counter()
    for name, step in steps:
        print(f"--- {name}", flush=True)
        try:
            rows.append((name, step()))
        except Exception as err:  # a failed step is a row of the table, and the others still run
            traceback.print_exc()
            rows.append((name, {"failed": f"{type(err).__name__}: {err}"[:160]}))
    import torch

    print(f"\nGPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| step | results |\n|---|---|")
    for name, values in rows:
        print(f"| {name} | " + "; ".join(f"{k} {v}" for k, v in values.items()) + " |")
    return 0 if all("failed" not in v for _, v in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
