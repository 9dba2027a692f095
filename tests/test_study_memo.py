"""What a study's in-process runs share (retention.models.shared_loads): a fresh copy of the base model for every
load, tokenised task data and known facts kept by everything they depend on, and a study whose results are the
same byte for byte with and without sharing."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import fit_config, prepare

import retention.models as models
from retention.data.datamodule import TaskDataModule
from retention.data.tasks import TaskConfig
from retention.study import Study, StudySpec


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_shared_model_comes_back_as_loaded_after_a_run_changed_it(tiny_llama):
    original = _state(models.load_model("tiny-llama")[0])
    with models.shared_loads({**models.SHARED_PER_KIND, "model": 1}) as memo:
        first, tokenizer = models.load_model("tiny-llama")
        with torch.no_grad():
            for p in first.parameters():
                p.add_(1.0)
        first.train()
        tokenizer.padding_side = "left"
        second, tokenizer2 = models.load_model("tiny-llama")
        assert memo.hits["model"] == 1
        assert second is not first and not second.training and tokenizer2.padding_side == "right"
        assert all(torch.equal(v, original[k]) for k, v in second.state_dict().items())
        assert {p.data_ptr() for p in second.parameters()}.isdisjoint(p.data_ptr() for p in first.parameters())
        models.load_model("tiny-gpt2")  # one set of base weights is kept: tiny-llama's is released
        models.load_model("tiny-llama")
        assert memo.hits["model"] == 1 and len(memo.values["model"]) == 1
    assert models._shared is None


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_task_data_is_shared_only_where_everything_it_depends_on_is_the_same(tmp_path, tiny_llama):
    source = _rows(tmp_path / "task.jsonl", [{"instruction": f"Name {i}.", "output": f"Item {i}"} for i in range(8)])

    def built(exclude=(), **fields):
        data = TaskDataModule(TaskConfig(family="instruct", source=str(source), val_fraction=0.25, **fields),
                              tokenizer=tiny_llama[1], exclude_terms=exclude)
        data.setup()
        return data.task

    with models.shared_loads() as memo:
        first = built()
        again = built()
        assert memo.hits["task"] == 1 and again.train.items is first.train.items
        assert built(exclude=["Item 3"]).n_dropped == 1
        assert len(built(max_length=4).train.items[0]["input_ids"]) == 4
        _rows(source, [{"instruction": f"Say {i}.", "output": f"Thing {i}"} for i in range(8)])
        changed = built()
        assert memo.hits["task"] == 1 and changed.train_examples[0].response.startswith("Thing")
    unshared = built()
    assert [i["input_ids"].tolist() for i in unshared.train.items] == [i["input_ids"].tolist() for i in
                                                                        changed.train.items]


def _without(obj, keys=("seconds", "timings", "select_s", "edit_s", "_s", "path", "dir", "folder", "time")):
    """``obj`` without timings and paths (keys naming them, at any depth)."""
    if isinstance(obj, dict):
        return {k: _without(v, keys) for k, v in obj.items() if not any(s in k for s in keys)}
    if isinstance(obj, list):
        return [_without(v, keys) for v in obj]
    return obj


@pytest.fixture
def study_file(tmp_path, tiny_llama) -> Path:
    """Two runs of the tiny pipeline (seeds 0 and 1), the facts chosen among those the model knows under prob."""
    prepare(tmp_path, tiny_llama[1])
    base = fit_config(tmp_path, protocols=["top1", "prob"])
    base["edits"]["known_protocol"] = "prob"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "memo.yaml"
    path.write_text(yaml.safe_dump({"name": "memo", "base": "base.yaml", "arms": {"baseline": {}}, "seeds": [0, 1]}))
    return path


def test_a_study_gives_the_same_results_with_and_without_sharing(study_file, tmp_path, monkeypatch):
    kept, shared_loads = [], models.shared_loads

    @contextlib.contextmanager
    def watched():
        with shared_loads({**models.SHARED_PER_KIND, "model": 1}) as memo:
            kept.append(memo)
            yield memo

    monkeypatch.setattr(models, "shared_loads", watched)
    spec = StudySpec.from_file(study_file)
    for name, share in (("shared", True), ("alone", False)):
        monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / name / "cache"))  # no disk cache reused between them
        states = Study(spec, str(tmp_path / name)).run(share=share)
        assert [s["state"] for s in states.values()] == ["done", "done"]
    (memo,) = kept
    assert memo.hits["model"] == 1 and memo.hits["task"] >= 1 and memo.hits["selection"] == 1
    for run in ("baseline__seed0", "baseline__seed1"):
        shared, alone = tmp_path / "shared" / "memo" / "runs" / run, tmp_path / "alone" / "memo" / "runs" / run
        summaries = [_without(json.loads((f / "summary.json").read_text())) for f in (shared, alone)]
        assert summaries[0] == summaries[1]
        assert summaries[0]["run"]["reused"]["selection"] is (run == "baseline__seed1")
        probes = sorted(p.relative_to(shared) for p in (shared / "probes").rglob("*") if p.is_file())
        assert probes and probes == sorted(p.relative_to(alone) for p in (alone / "probes").rglob("*") if p.is_file())
        assert all((shared / p).read_bytes() == (alone / p).read_bytes() for p in probes)
