"""Studies: the same small study on the default model with its shared work (known-fact selection and edit
caches) against the same runs with ``edits.cache: false`` (every run selects and edits itself).

4 arms that differ only after editing (baseline, freeze edited, freeze a +-2 window, only edited) x 1 seed; ROME
sequential on 4 built-in facts, 8 controls, 10 fine-tuning steps, top1 and prob. With sharing, the first run
selects and edits and the other three reuse both. Each way starts from an empty selection/edit cache (the
converted model and the key statistics are shared, as they would be between any two studies). One timed run
of each way, sharing first (a whole study is minutes; the ratio is what to read).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from retention.models import cache_dir
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

def _fresh_cache(tmp: Path) -> Path:
    """A cache folder sharing the converted model and key statistics, with no selection or edit entries."""
    cache = tmp / "cache"
    cache.mkdir()
    for shared in ("models", "covariance", "prose"):
        if (cache_dir() / shared).exists():
            (cache / shared).symlink_to(cache_dir() / shared)
    return cache

def run() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    cwd, previous = os.getcwd(), os.environ.get("RETENTION_CACHE")
    os.chdir(ROOT)  # the ROME preset reads its key-statistics corpus relative to the repository root
    seconds, reused = {}, {}
    try:
        for cache in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["RETENTION_CACHE"] = str(_fresh_cache(Path(tmp)))
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
        if previous is None:
            os.environ.pop("RETENTION_CACHE", None)
        else:
            os.environ["RETENTION_CACHE"] = previous
    print(f"study of 4 runs: with sharing {seconds[True]:.0f} s ({4 - reused[True]} edit(s) computed, "
          f"{reused[True]} reused), without {seconds[False]:.0f} s ({4 - reused[False]} edits computed): "
          f"{seconds[False] / seconds[True]:.2f}x")
