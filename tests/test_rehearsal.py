"""Rehearsal: the edited statements replace the stated fraction of training rows, only in the allowed phrasings
(never an evaluation paraphrase), controls only when asked, the same stream on every run and after a resume;
rate 0 leaves batches alone."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from tiny_runs import fit_config, prepare

from retention.callbacks.rehearsal import Rehearsal, statements
from retention.data.readers import load_records
from retention.data.selection import KnowledgeSets
from retention.data.tasks.examples import IGNORE_INDEX
from retention.pipeline_contract import PipelineState

BATCH, WIDTH = 8, 12


@pytest.fixture(scope="module")
def sets() -> KnowledgeSets:
    records = load_records("builtin")
    edit = records[:3]
    # A record whose own augmentations leak an evaluation paraphrase: it must never be rehearsed.
    leaked = [p.replace(edit[0].subject, "{}") for p in edit[0].paraphrases]
    edit[0] = dataclasses.replace(edit[0], augmentations=[*leaked, *edit[0].augmentations])
    return KnowledgeSets(edit=edit, control=records[3:6])


def _module(tokenizer, sets: KnowledgeSets) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=tokenizer, pipeline=PipelineState(sets=sets), device=torch.device("cpu"))


def _trainer(step: int, rank: int = 0, world: int = 1) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, accumulate_grad_batches=1, global_rank=rank, world_size=world)


def _batch(step: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(BATCH * WIDTH).view(BATCH, WIDTH) + 1000 * step
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _stream(callback: Rehearsal, module, steps: range, rank: int = 0, world: int = 1) -> list[dict]:
    out = []
    for step in steps:
        batch = _batch(step)
        callback.on_train_batch_start(_trainer(step, rank, world), module, batch, step)
        out.append(batch)
    return out


def _rehearsed(tokenizer, sets, batches: list[dict]) -> list[str]:
    """The decoded rows that are not task rows (task rows are 1000 * step + arange)."""
    rows = []
    for step, batch in enumerate(batches):
        task = _batch(step)["input_ids"]
        for i in range(batch["input_ids"].shape[0]):
            mask = batch["attention_mask"][i].bool()
            ids = batch["input_ids"][i][mask]
            if len(ids) == WIDTH - 2 and torch.equal(ids, task[i][: WIDTH - 2]):
                continue
            # Every statement token carries loss, padding none.
            assert torch.equal(batch["labels"][i][mask], ids)
            assert (batch["labels"][i][~mask] == IGNORE_INDEX).all()
            rows.append(tokenizer.decode(ids, skip_special_tokens=True))
    return rows


def _make(tokenizer, sets, **kw) -> tuple[Rehearsal, SimpleNamespace]:
    callback, module = Rehearsal(**kw), _module(tokenizer, sets)
    callback.on_edits_applied(None, module, sets)
    return callback, module


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_statements_replace_rows_at_the_stated_rate(tiny_llama, sets, rate):
    tok = tiny_llama[1]
    callback, module = _make(tok, sets, rate=rate)
    steps = 40
    rows = _rehearsed(tok, sets, _stream(callback, module, range(steps)))
    assert len(rows) == int(rate * BATCH * steps) == callback.rows == module.pipeline.stats["rehearsal_rows"]
    wanted = {f"{r.rewrite_prompt} {r.target_new}" for r in sets.edit}
    assert set(rows) == wanted  # every statement, round robin, nothing else
    counts = [rows.count(s) for s in wanted]
    assert max(counts) - min(counts) <= 1


def test_only_allowed_phrasings_and_controls_only_when_asked(tiny_llama, sets):
    tok = tiny_llama[1]
    for controls in (False, True):
        callback, module = _make(tok, sets, rate=0.5, phrasings="editing", controls=controls)
        rows = set(_rehearsed(tok, sets, _stream(callback, module, range(30))))
        assert rows == {f"{p} {t}" for p, t in statements(sets, "editing", controls, 3)}
        paraphrases = {p for r in sets.edit + sets.control for p in r.paraphrases}
        assert not any(row.startswith(p) for row in rows for p in paraphrases)
        has_control = any(f"{r.rewrite_prompt} {r.target_true}" in rows for r in sets.control)
        assert has_control == controls
        assert len(rows) > len(sets.edit) * (1 + controls)  # the editing phrasings are there
    rewrite_only = {f"{p} {t}" for p, t in statements(sets, "rewrite")}
    assert rewrite_only == {f"{r.rewrite_prompt} {r.target_new}" for r in sets.edit}


def test_the_stream_is_a_function_of_seed_and_step_distinct_per_rank(tiny_llama, sets):
    tok = tiny_llama[1]
    run = [_stream(*_make(tok, sets, rate=0.3, seed=1), range(12)) for _ in range(2)]
    resumed = _stream(*_make(tok, sets, rate=0.3, seed=1), range(6, 12))  # a fresh callback at step 6
    for a, b in zip(run[0], run[1]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(run[0][6:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_seed = _stream(*_make(tok, sets, rate=0.3, seed=2), range(12))
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(run[0], other_seed))
    ranks = [_rehearsed(tok, sets, _stream(*_make(tok, sets, rate=0.25), range(3), rank, 2)) for rank in (0, 1)]
    assert ranks[0] != ranks[1] and len(ranks[0]) == len(ranks[1]) == 6


def test_rate_zero_changes_nothing(tiny_llama, sets):
    callback, module = _make(tiny_llama[1], sets, rate=0.0)
    for step, batch in enumerate(_stream(callback, module, range(5))):
        assert all(torch.equal(batch[k], _batch(step)[k]) for k in batch)
    assert callback.rows == 0 and not module.pipeline.stats


@pytest.mark.parametrize(("kwargs", "flag"), [({"rate": 1.0}, "--rehearsal.rate"), ({"rate": -0.1}, "--rehearsal.rate"),
                                              ({"phrasings": "paraphrases"}, "--rehearsal.phrasings"),
                                              ({"k": -1}, "--rehearsal.k")])
def test_bad_arguments_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        Rehearsal(**kwargs)


def test_rehearsal_without_edits_is_refused_naming_the_flag(tiny_llama):
    module = _module(tiny_llama[1], KnowledgeSets())
    with pytest.raises(ValueError, match="--rehearsal.rate"):
        Rehearsal(rate=0.5).on_fit_start(None, module)  # ApplyEdits never handed it any statement
    with pytest.raises(ValueError, match="--rehearsal.rate"):
        _make(tiny_llama[1], KnowledgeSets(), rate=0.5)
    Rehearsal().on_fit_start(None, module)  # off: nothing to refuse


def test_a_fit_with_rehearsal_trains_and_reports_its_counts(tmp_path, tiny_llama):
    from retention.commands.fit import main

    prepare(tmp_path, tiny_llama[1])
    config = fit_config(tmp_path, "rehearse", protocols=["prob"])
    config["rehearsal"] = {"rate": 0.25, "controls": True}
    path = tmp_path / "rehearse.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert main(["--config", str(path)]) == 0
    summary = json.loads((tmp_path / "runs" / "rehearse" / "summary.json").read_text())
    assert summary["run"]["rehearsal_rows"] == 3  # 3 steps of 4 rows at 0.25
    assert summary["run"]["rehearsal_tokens"] > 3
    assert summary["final_step"] == 3
