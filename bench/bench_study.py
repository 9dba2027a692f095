"""Studies: the same small study on the default model with its shared work (known-fact selection, edit and t=0
caches), with only the selection and edit caches (``monitor.share_t0: false``), and with none (also
``edits.cache: false``: every run selects, edits and measures t=0 itself).

4 arms that differ only after editing (baseline, freeze edited, freeze a +-2 window, only edited) x 1 seed; ROME
sequential on 4 built-in facts, 8 controls, 10 fine-tuning steps, top1 and prob. With sharing, the first run
selects, edits and measures t=0 and the other three reuse all three. Each way starts with no selection, edit or
t=0 cache entries (the converted model, key statistics, context templates and projectors are kept, as between any
two studies). One timed run of each way, all sharing first (a whole study is minutes; the ratios are what to read).
Before them, what a run that reuses t=0 spends on it against measuring it, on the same probes.
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
from unittest import mock

from bench.common import interleaved_medians
from retention.paths import cache_dir
from retention.study import Study, StudySpec

ROOT = Path(__file__).resolve().parents[1]


WAYS = {"all": (True, True), "edit": (True, False), "none": (False, False)}
"""Name -> (edits.cache, monitor.share_t0)."""


def _spec(out_dir: str, cache: bool, share_t0: bool) -> StudySpec:
    return StudySpec.from_dict({
        "name": f"sharing_{cache}_{share_t0}",
        "base": "configs/demo.yaml",
        "out_dir": out_dir,
        "set": {"run.wandb": "disabled", "edits.n_edit": 4, "edits.n_control": 8, "edits.max_candidates": 40,
                "edits.editor": "rome", "edits.mode": "sequential", "edits.cache": cache,
                "data.task.block_size": 64, "trainer.max_steps": 10, "monitor.every_n_steps": 5,
                "monitor.protocols": ["top1", "prob"], "monitor.share_t0": share_t0},
        "arms": {"baseline": {}, "freeze_edited": {"freeze.policy": "edited"},
                 "freeze_window": {"freeze.policy": "window", "freeze.window": 2},
                 "only_edited": {"freeze.policy": "only_edited"}},
        "seeds": [0],
    }, source="bench", root=ROOT)

@contextlib.contextmanager
def _no_shared_entries():
    """The user cache without selection, edit and t=0 entries (set aside and put back afterwards): the converted
    model, key statistics, context templates and projectors stay, as they would between any two studies."""
    root = cache_dir()
    kept = {name: root / f"{name}.bench-set-aside" for name in ("selection", "edits", "t0")}
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


def _t0() -> None:
    """t=0 of the study's probes (4 edits, 8 controls; top1 and prob, the monitor's batch size) on the default
    model: measured, and read back from the t=0 cache."""
    from retention.callbacks.apply_edits import ApplyEdits
    from retention.callbacks.probing import ScoreSettings, measure
    from retention.callbacks.t0_cache import measure_t0
    from retention.models import load_model, model_fingerprint
    from retention.pipeline_contract import PipelineState

    model, tokenizer = load_model("smollm2-135m")
    probes = ApplyEdits(known_protocol="none", n_edit=4, n_control=8).select(pl_module=None).sets.probes()
    settings = ScoreSettings(("top1", "prob"))
    state = PipelineState(edit={"base_fingerprint": model_fingerprint(model), "editor": "rome"}, edited_layers=[5])
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"RETENTION_CACHE": tmp}):
        times = interleaved_medians({"measured": lambda: measure(model, tokenizer, probes, settings, 0),
                                     "reused": lambda: measure_t0(model, tokenizer, probes, settings, state)})
    assert state.stats["t0_reused"] == 1
    print(f"t=0 of {len(probes)} probes: measured {times['measured']:.2f} s, reused {times['reused']:.3f} s "
          f"(key and lookup): {times['measured'] / times['reused']:.0f}x")


def run() -> None:
    _t0()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the ROME preset reads its key-statistics corpus relative to the repository root
    seconds, edits, t0s = {}, {}, {}
    try:
        for way, (cache, share_t0) in WAYS.items():
            with tempfile.TemporaryDirectory() as tmp, _no_shared_entries():
                study = Study(_spec(tmp, cache, share_t0))
                t0 = time.perf_counter()
                states = study.run()
                seconds[way] = time.perf_counter() - t0
                assert all(s["state"] == "done" for s in states.values()), states
                runs = [json.loads((study.runs_dir / name / "summary.json").read_text())["run"] for name in states]
                edits[way] = sum(bool(r["reused"].get("edit")) for r in runs)
                t0s[way] = sum(r.get("t0_reused", 0) for r in runs)
    finally:
        os.chdir(cwd)
    for way in WAYS:
        print(f"study of 4 runs, sharing {way}: {seconds[way]:.0f} s (edit reused {edits[way]}x, "
              f"t=0 reused {t0s[way]}x)")
    print(f"none / all {seconds['none'] / seconds['all']:.2f}x; none / edit {seconds['none'] / seconds['edit']:.2f}x; "
          f"edit / all (what sharing t=0 saves) {seconds['edit'] / seconds['all']:.2f}x")
