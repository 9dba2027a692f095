"""ROME on the default model: median time per edit, and the v* loop against the same loop run naively.

The naive loop is what ROME-style code usually does: every step a full forward and backward through all layers
with weight gradients. Ours computes no weight gradients and runs the frozen layers below the edited one once.
Both optimise the same δ (the largest relative difference is printed).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from bench.common import interleaved_medians
from bench.reference import naive_targets

REQUESTS = [
    ("bench-1", "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    ("bench-2", "Toko Yasuda", "{} is known for playing the", "piano", "guitar"),
    ("bench-3", "the Eiffel Tower", "You can find {} in the city of", "Rome", "Paris"),
]


def run() -> None:
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
    diff = ((fast.delta - slow.delta).norm() / slow.delta.norm()).item()
    medians = interleaved_medians({
        "cached prefix, no weight grads": lambda: optimise_targets(model, tokenizer, [req], templates, fixed,
                                                                   hp.layer),
        "naive (all layers, weight grads)": lambda: naive_targets(model, tokenizer, [req], templates, fixed,
                                                                  hp.layer),
    }, repeats=2)
    for name, t in medians.items():
        print(f"v* loop, {name:<34} median {t:.2f} s ({fixed.v_steps} steps, {len(templates)} rewriting prompts)")
    naive, ours = medians["naive (all layers, weight grads)"], medians["cached prefix, no weight grads"]
    print(f"v* loop speed-up: {naive / ours:.2f}x (target >= 1.5x); same delta: relative difference {diff:.1e}")
