"""A run killed mid-epoch (SIGKILL, as a preempted job) and resumed with ``--ckpt_path last`` ends exactly as the
uninterrupted run: same weights trained on the same batches, same token count, same curves, same per-probe
results and the same ``metrics.csv`` rows; and run folders never mix."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import fit_config, prepare, prepare_distinct

from retention.callbacks.checkpoint import load_checkpoint
from retention.commands.fit import main
from retention.study.report import ReportError, load_results
from retention.summary import INCOMPLETE

TESTS = Path(__file__).resolve().parent
# 30 training examples in batches of 4: 8 batches per epoch. Checkpoints at steps 5 and 10; the kill comes at
# step 11, in the second epoch, so the resume starts mid-epoch in an epoch other than the first.
STEPS, EVERY, KILL = 12, 5, 11


def _write(root: Path, name: str, config: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama) -> tuple[Path, Path, Path]:
    """(root, uninterrupted run's config, killed run's config)."""
    root = tmp_path_factory.mktemp("resume")
    prepare(root, tiny_llama[1])
    source = prepare_distinct(root)
    configs = []
    for name in ("straight", "killed"):
        config = fit_config(root, name, max_steps=STEPS)
        config["data"]["task"]["source"] = str(source)
        config["run"]["checkpoint_every"] = EVERY
        config["monitor"]["every_n_steps"] = 4
        configs.append(_write(root, name, config))
    assert main(["--config", str(configs[0])]) == 0
    return root, *configs


def _metrics(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def _probes(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((folder / "probes").iterdir())}


def test_killed_and_resumed_run_equals_the_uninterrupted_run(runs):
    root, straight, killed = runs
    kill = _write(root, "kill", {"trainer": {"callbacks": [{"class_path": "tiny_runs.KillAt",
                                                           "init_args": {"step": KILL}}]}})
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-m", "retention", "fit", "--config", str(killed), "--config", str(kill)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    folder = root / "runs" / "killed"
    assert (folder / INCOMPLETE).exists() and not (folder / "summary.json").exists()
    with pytest.raises(ReportError, match="has not finished"):
        load_results([folder])
    checkpoint = load_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 10 and checkpoint["epoch"] == 1
    # The killed run had one more callback (the one that killed it): the resume says it may differ.
    resume = ["--ckpt_path", "last", "--run.resume_changes", "[trainer.callbacks]"]
    assert main(["--config", str(killed), *resume]) == 0

    one = root / "runs" / "straight"
    a, b = (json.loads((f / "summary.json").read_text()) for f in (one, folder))
    for key in ("t0", "retention", "final_accuracy", "curves", "flip_ratio"):
        assert b[key] == a[key], key
    assert b["downstream"] == a["downstream"]  # val loss before/after and trained tokens, all exactly equal
    assert _probes(folder) == _probes(one)
    assert _metrics(folder) == _metrics(one)
    assert not (folder / INCOMPLETE).exists() and not (folder / "checkpoints").exists()


def test_a_run_folder_is_never_reused_silently(runs):
    root, straight, _ = runs
    with pytest.raises(FileExistsError, match="run.overwrite"):
        main(["--config", str(straight)])
    # Overwritten by a 1-step run, in a copy: the 12-step run stays the resume test's reference.
    again = shutil.copytree(root / "runs" / "straight", root / "runs" / "again")
    stale = again / "probes" / "step_999999.jsonl"
    stale.write_text("{}\n")
    assert main(["--config", str(straight), "--run.name", "again", "--run.overwrite", "true",
                 "--run.checkpoint_every", "0", "--trainer.max_steps", "1"]) == 0
    assert not stale.exists() and json.loads((again / "summary.json").read_text())["final_step"] == 1


def test_resume_without_a_checkpoint_is_refused(runs):
    root, straight, _ = runs
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["--config", str(straight), "--run.name", "nothing_here", "--ckpt_path", "last"])
