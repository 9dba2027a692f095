"""The whole pipeline through `retention fit` on a tiny model: select, edit, measure, fine-tune, measure, report;
and the same run on 2 CPU DDP ranks (gloo) giving the same numbers as on 1 rank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tiny_runs import N_CONTROL, N_EDIT, PROTOCOLS, RATES, read_run, write_config

from retention.records import GROUPS


def test_pipeline_writes_the_run_folder(one_rank):
    _, folder = one_rank
    summary, probes = read_run(folder)
    run = summary["run"]
    assert run["n_edit"] == N_EDIT and run["n_control"] == N_CONTROL and run["edited_layers"] == [0]
    assert [d["case_id"] for d in run["edit_diagnostics"]] == run["edit_case_ids"]
    assert not set(run["edit_case_ids"]) & set(run["control_case_ids"])
    assert summary["protocols"] == PROTOCOLS and summary["final_step"] == 3
    # t=0, the step-2 measurement and the end; every probe once per measurement.
    assert sorted(probes) == ["step_000000.jsonl", "step_000002.jsonl", "step_000003.jsonl"]
    n_probes = len(probes["step_000000.jsonl"])
    assert all(len(rows) == n_probes for rows in probes.values())
    t0 = probes["step_000000.jsonl"]
    assert sum(r["group"] == "edit" for r in t0) == N_EDIT and sum(r["group"] == "control" for r in t0) == N_CONTROL
    assert "edit_portability" not in summary["t0"]  # the built-in facts have no portability probes
    for group in (g for g in GROUPS if g != "edit_portability"):
        for protocol in PROTOCOLS:
            final = [r for r in probes["step_000003.jsonl"] if r["group"] == group]
            before = {r["prompt"]: r["passed"][protocol] for r in t0 if r["group"] == group}
            kept = sum(before[r["prompt"]] and r["passed"][protocol] for r in final)
            rate = summary["retention"][protocol][group]
            assert (rate["count"], rate["denominator"]) == (kept, sum(before.values()))
            acc = summary["t0"][group][protocol]
            assert (acc["count"], acc["denominator"]) == (sum(before.values()), len(before))
    # The edits land under `prob` on this model, so edited retention has a denominator.
    assert summary["retention"]["prob"]["edit"]["denominator"] > 0
    assert summary["flip_ratio"]["prob"] == pytest.approx(1 - summary["retention"]["prob"]["edit"]["value"])
    assert [p for p, _ in summary["curves"]["edit"]["prob"]] == [0, 2, 3]
    assert summary["timings"]["edit_s"] > 0 and summary["downstream"]["train_tokens"] > 0
    env = summary["environment"]
    assert env["device"] == "cpu" and env["world_size"] == 1 and env["threads"] >= 1 and env["torch"]
    # Validation before and after fine-tuning (`retention fit` validates after fit when the last step had none).
    assert [v["step"] for v in (summary["downstream"]["first"], summary["downstream"]["last"])] == [0, 3]
    assert (folder / "retention_curves.png").stat().st_size > 10_000
    assert (folder / "config.yaml").exists()
    csv = (folder / "metrics.csv").read_text().splitlines()[0]
    assert "retention/edit_prob" in csv and "accuracy/control_top1" in csv
    assert not list(folder.rglob("*.tmp"))


def test_pipeline_on_two_ddp_ranks_matches_one_rank(one_rank, tmp_path):
    config, folder = one_rank
    ddp = write_config(config.parent, "two", devices=2, strategy="ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "retention", "fit", "--config", str(ddp)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    one, one_probes = read_run(folder)
    two, two_probes = read_run(config.parent / "runs" / "two")
    for key in RATES:
        assert two[key] == one[key], key
    # Per-probe results come back in probe order from the rank shards: none lost, none repeated.
    strip = ("target_logprob", "alt_logprob")
    for name, rows in one_probes.items():
        assert [{k: v for k, v in r.items() if k not in strip} for r in two_probes[name]] == \
               [{k: v for k, v in r.items() if k not in strip} for r in rows]


def test_resumed_run_continues_the_curves(one_rank):
    """Stop after 2 steps with a checkpoint, resume to 3 (a change the resume must be allowed: max_steps can
    shape the schedule): the same curves as the uninterrupted run."""
    config, folder = one_rank
    from retention.commands.fit import main

    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 2, "save_top_k": -1}}
    resume = write_config(config.parent, "resume", max_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    assert main(["--config", str(resume)]) == 0
    (ckpt,) = (config.parent / "runs" / "resume" / "checkpoints").glob("*.ckpt")
    assert main(["--config", str(resume), "--trainer.max_steps", "3", "--ckpt_path", str(ckpt),
                 "--run.resume_changes", "[trainer.max_steps]"]) == 0
    resumed, probes = read_run(config.parent / "runs" / "resume")
    one, _ = read_run(folder)
    assert resumed["curves"] == one["curves"] and resumed["retention"] == one["retention"]
    assert sorted(probes) == ["step_000000.jsonl", "step_000002.jsonl", "step_000003.jsonl"]
