"""What the GRACE and WISE tests share: a rewrite check, a few fine-tuning steps, and single edits of known facts on
the default model."""

from __future__ import annotations

import torch
from editing_models import UNRELATED, rewrite_probe, same_state, state

from retention.editing.base import EditRequest, run_edits
from retention.editing.registry import build_editor
from retention.scoring import score_probes


def passes(model, tokenizer, req: EditRequest) -> bool:
    """Whether the model's top-1 continuation of the request's prompt is its new target."""
    return score_probes(model, tokenizer, [rewrite_probe(req)])[0].passed["top1"]


def fine_tune(model, tokenizer, req: EditRequest, steps: int = 3) -> None:
    """A few SGD steps on every parameter, on the request's true statement and an unrelated sentence."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = tokenizer([req.rewrite_prompt + " " + req.target_true, UNRELATED], return_tensors="pt", padding=True)
    model.train()
    for _ in range(steps):
        loss = model(**ids, labels=ids["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def single_edits_of_known_facts(real_model, editor_name: str, n: int, data: str) -> tuple[list[bool], list[bool]]:
    """The first ``n`` facts of ``data`` the default model knows, each edited alone with the editor's preset and
    scored under ``prob``: (each rewrite passes, each neighbourhood probe that passed unedited still passes)."""
    from retention.data.readers import load_records
    from retention.data.selection import select_known_facts

    model, tokenizer = real_model
    known = select_known_facts(model, tokenizer, load_records(data, limit=8 * n))[:n]
    saved = state(model)
    editor = build_editor(editor_name, model_name="smollm2-135m")
    before = score_probes(model, tokenizer, [p for r in known for p in r.edit_probes()])
    after = []
    for r in known:
        (result,) = run_edits(editor, model, tokenizer, [EditRequest.from_record(r)], "single")
        result.apply(model)
        try:
            after += score_probes(model, tokenizer, r.edit_probes())
        finally:
            result.revert(model)
    assert same_state(model, saved)
    rewrites = [a.passed["prob"] for a in after if a.probe.kind == "rewrite"]
    kept = [a.passed["prob"] for b, a in zip(before, after) if b.probe.kind == "neighborhood" and b.passed["prob"]]
    return rewrites, kept
