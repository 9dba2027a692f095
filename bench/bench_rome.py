"""ROME on the default model: median time per edit, ``retention edit --mode single`` on the first known CounterFact
facts (time per edit and its scores), and the v* loop against the same loop run naively.

The facts are the first ``BENCH_ROME_FACTS`` (default 40) known facts of ``FACTS``; 0 skips that part. The naive loop is what ROME-style code usually does: every step a full forward and backward through all layers
with weight gradients. Ours computes no weight gradients, runs the frozen layers below the edited one once, and
runs the positions before the subject once (their keys and values held); it is also timed running every position
at every step.
Both optimise the same δ (the largest relative difference is printed).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

from bench.common import interleaved_medians
from bench.reference import full_position_targets, naive_targets

FACTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact_preknown.json"

REQUESTS = [
    ("bench-1", "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    ("bench-2", "Toko Yasuda", "{} is known for playing the", "piano", "guitar"),
    ("bench-3", "the Eiffel Tower", "You can find {} in the city of", "Rome", "Paris"),
]


def _scores(summary: dict) -> str:
    return "  ".join(f"{name} {p} {summary['edited'][group][p]['value']:.1%}"
                     for name, group in (("ES", "edit"), ("PS", "edit_paraphrase"), ("NS", "edit_neighborhood"))
                     for p in ("prob", "top1"))


def single_edits(n: int) -> None:
    """``retention edit --editor rome --mode single`` on the first ``n`` known facts of ``FACTS`` (its scoring,
    nothing saved), twice: each fact by its own ``edit`` call (seconds per edit: median over the facts, and the
    command's mean), then as the command runs it, the facts' targets optimised together (``edit_singles``; the
    command's mean); ES/PS/NS of each."""
    from retention.commands.edit import EditArgs
    from retention.commands.edit import run as edit
    from retention.editing.base import Editor
    from retention.editing.rome import RomeEditor

    per_fact: list[float] = []
    timed = RomeEditor.edit

    def timing(self, model, tokenizer, requests, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return timed(self, model, tokenizer, requests, *args, **kwargs)
        finally:
            per_fact.extend([(time.perf_counter() - t0) / len(requests)] * len(requests))

    args = dict(editor="rome", data=str(FACTS), n=n, mode="single", save_model=False)
    with tempfile.TemporaryDirectory() as out, mock.patch.object(RomeEditor, "edit", timing), \
            mock.patch.object(RomeEditor, "edit_singles", Editor.edit_singles):
        alone = edit(EditArgs(**args, out=out))
    with tempfile.TemporaryDirectory() as out:
        together = edit(EditArgs(**args, out=out))
    median = statistics.median(per_fact) if per_fact else float("nan")
    print(f"ROME single edits of {alone['n_edits']} known facts ({torch.get_num_threads()} threads), one by one: "
          f"median {median:.2f} s per edit, mean {alone['seconds_per_edit']:.2f} s (with the set-up)\n"
          f"  {_scores(alone)}")
    print(f"the same, optimised together (edit_singles): mean {together['seconds_per_edit']:.2f} s per edit (with "
          f"the set-up)\n  {_scores(together)}")


def run() -> None:
    n = int(os.environ.get("BENCH_ROME_FACTS", "40"))
    if n:
        single_edits(n)
    from retention.editing.base import EditRequest
    from retention.editing.registry import build_editor
    from retention.editing.targets import optimise_targets
    from retention.models import DEFAULT_MODEL, load_model

    model, tokenizer = load_model(DEFAULT_MODEL)
    requests = [EditRequest(*r) for r in REQUESTS]
    # The edit time does not depend on the size of the key statistics; a small sample keeps a cold cache cheap.
    editor = build_editor("rome", model_name=DEFAULT_MODEL, mom2_samples=200)
    hp = editor.hparams
    t0 = time.perf_counter()
    editor.prepare(model, tokenizer)
    print(f"preparation (context templates, key statistics; cached on disk): {time.perf_counter() - t0:.1f} s")

    times = []
    for req in requests:
        t0 = time.perf_counter()
        editor.edit(model, tokenizer, [req])
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"ROME edit ({torch.get_num_threads()} threads), layer {hp.layer}, {hp.v_steps} v* steps, "
          f"{len(editor.templates)} context templates: median {times[len(times) // 2]:.2f} s per edit "
          f"over {len(times)} edits")

    # A fixed number of steps, so both loops do the same work.
    fixed = replace(hp, v_steps=10, early_stop_loss=0.0)
    templates = editor.templates
    req = requests[0]
    fast = optimise_targets(model, tokenizer, [req], templates, fixed, hp.layer)[0]
    slow = naive_targets(model, tokenizer, [req], templates, fixed, hp.layer)[0]
    full = full_position_targets(model, tokenizer, [req], templates, fixed, hp.layer)[0]
    diff = ((fast.delta - slow.delta).norm() / slow.delta.norm()).item()
    diff_full = ((fast.delta - full.delta).norm() / full.delta.norm()).item()
    medians = interleaved_medians({
        "held prefix keys, no weight grads": lambda: optimise_targets(model, tokenizer, [req], templates, fixed,
                                                                   hp.layer),
        "same, every position every step": lambda: full_position_targets(model, tokenizer, [req], templates,
                                                                         fixed, hp.layer),
        "naive (all layers, weight grads)": lambda: naive_targets(model, tokenizer, [req], templates, fixed,
                                                                  hp.layer),
    }, repeats=2)
    for name, t in medians.items():
        print(f"v* loop, {name:<34} median {t:.2f} s ({fixed.v_steps} steps, {len(templates)} rewriting prompts)")
    naive, ours = medians["naive (all layers, weight grads)"], medians["held prefix keys, no weight grads"]
    print(f"v* loop speed-up: {naive / ours:.2f}x (target >= 1.5x); same delta: relative difference {diff:.1e}")
    full_t = medians["same, every position every step"]
    print(f"held keys before the subject: {full_t / ours:.2f}x over running every position; same delta: relative "
          f"difference {diff_full:.1e}")
