"""The single protocol's edits one by one vs optimised together (``Editor.edit_singles``), ROME on the default model.

The first ``N`` CounterFact facts the model knows (top1) of ``counterfact_preknown.json`` in the shared data folder
(``$RETENTION_DATA``, else ``../shared/data``), each edited alone on the unedited model: one ``edit`` per fact, then
one ``edit_singles`` for all. Prints the seconds per edit of each, their ratio, and the largest difference of the
two ways' deltas: max |Δ| absolute, and relative to the norm of the delta. ``BENCH_SINGLES_N`` sets ``N`` (20).
"""

from __future__ import annotations

import os
import time

import torch

from retention.corpus import shared_data_dir
from retention.data.readers import load_records
from retention.data.selection import select_known
from retention.editing.base import EditRequest
from retention.editing.registry import build_editor
from retention.models import DEFAULT_MODEL, load_model

N = int(os.environ.get("BENCH_SINGLES_N", "20"))


def run() -> None:
    data = shared_data_dir()
    if data is None:
        raise FileNotFoundError("bench singles needs the shared data folder: set RETENTION_DATA")
    model, tokenizer = load_model(DEFAULT_MODEL)
    records = select_known(model, tokenizer, load_records(data / "counterfact" / "counterfact_preknown.json"), N)
    requests = [EditRequest.from_record(r) for r in records]
    # The edit time does not depend on the size of the key statistics; a small sample keeps a cold cache cheap.
    editor = build_editor("rome", model_name=DEFAULT_MODEL, mom2_samples=200)
    editor.prepare(model, tokenizer)

    t0 = time.perf_counter()
    alone = [editor.edit(model, tokenizer, [r]) for r in requests]
    one_by_one = (time.perf_counter() - t0) / len(requests)
    t0 = time.perf_counter()
    together = editor.edit_singles(model, tokenizer, requests)
    batched = (time.perf_counter() - t0) / len(requests)

    absolute = relative = 0.0
    for a, b in zip(alone, together):
        for name, delta in a.deltas.items():
            diff = (b.deltas[name] - delta).abs().max().item()
            absolute = max(absolute, diff)
            relative = max(relative, diff / delta.norm().item())
    print(f"ROME, {len(requests)} known facts, {torch.get_num_threads()} threads, layer {editor.hparams.layer}, "
          f"{editor.hparams.v_steps} v* steps at most, {len(editor.templates)} context templates")
    print(f"one by one: {one_by_one:.2f} s per edit; edit_singles: {batched:.2f} s per edit; "
          f"speed-up {one_by_one / batched:.2f}x")
    print(f"same deltas: max |Δ| {absolute:.2e}, relative to the delta's norm {relative:.2e}")
