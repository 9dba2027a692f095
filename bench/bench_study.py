"""Studies: the same small study on the default model with its shared work (known-fact selection and edit
caches) against the same runs with ``edits.cache: false`` (every run selects and edits itself).

4 arms that differ only after editing (baseline, freeze edited, freeze a +-2 window, only edited) x 1 seed; ROME
sequential on 4 built-in facts, 8 controls, 10 fine-tuning steps, top1 and prob. With sharing, the first run
selects and edits and the other three reuse both. Each way starts with no selection or edit cache entries (the
converted model, key statistics, context templates and projectors are kept, as between any two studies). One timed run
of each way, sharing first (a whole study is minutes; the ratio is what to read).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from retention.paths import cache_dir
from retention.study import Study, StudySpec

ROOT = Path(__file__).resolve().parents[1]


def _spec(out_dir: str, cache: bool) -> StudySpec:
    return StudySpec.from_dict({
        "name": "sharing" if cache else "no_sharing",
        "base": "configs/demo.yaml",
        "out_dir": out_dir,
        "set": {"run.wandb": "disabled", "edits.n_edit": 4, "edits.n_control": 8, "edits.max_candidates": 40,
                "edits.editor": "rome", "edits.mode": "sequential", "edits.cache": cache,
                "data.task.block_size": 64, "trainer.max_steps": 10, "monitor.every_n_steps": 5,
                "monitor.protocols": ["top1", "prob"]},
        "arms": {"baseline": {}, "freeze_edited": {"freeze.policy": "edited"},
                 "freeze_window": {"freeze.policy": "window", "freeze.window": 2},
                 "only_edited": {"freeze.policy": "only_edited"}},
        "seeds": [0],
    }, source="bench", root=ROOT)

@contextlib.contextmanager
def _no_shared_entries():
    """The user cache without selection and edit entries (set aside and put back afterwards): the converted
    model, key statistics, context templates and projectors stay, as they would between any two studies."""
    root = cache_dir()
    kept = {name: root / f"{name}.bench-set-aside" for name in ("selection", "edits")}
    for name, aside in kept.items():
        if (root / name).exists():
            (root / name).rename(aside)
    try:
        yield
    finally:
        for name, aside in kept.items():
            shutil.rmtree(root / name, ignore_errors=True)
            if aside.exists():
                aside.rename(root / name)


def run() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the ROME preset reads its key-statistics corpus relative to the repository root
    seconds, reused = {}, {}
    try:
        for cache in (True, False):
            with tempfile.TemporaryDirectory() as tmp, _no_shared_entries():
                study = Study(_spec(tmp, cache))
                t0 = time.perf_counter()
                states = study.run()
                seconds[cache] = time.perf_counter() - t0
                assert all(s["state"] == "done" for s in states.values()), states
                reused[cache] = sum(
                    json.loads((study.runs_dir / name / "summary.json").read_text())["run"]["reused"].get("edit", False)
                    for name in states)
    finally:
        os.chdir(cwd)
    print(f"study of 4 runs: with sharing {seconds[True]:.0f} s ({4 - reused[True]} edit(s) computed, "
          f"{reused[True]} reused), without {seconds[False]:.0f} s ({4 - reused[False]} edits computed): "
          f"{seconds[False] / seconds[True]:.2f}x")
