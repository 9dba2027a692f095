"""ApplyEdits on its own: selection, the single protocol's run index, the state it writes (and the task exclusion terms),
argument errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from editing_models import edit_model

from retention.callbacks.apply_edits import ApplyEdits
from retention.callbacks.probing import shard
from retention.data.readers import load_records
from retention.data.selection import KnowledgeSets
from retention.models import model_fingerprint
from retention.pipeline_contract import PipelineState


def _select(**kw) -> KnowledgeSets:
    return ApplyEdits(known_protocol="none", **kw).select(pl_module=None).sets


def test_selection_is_seeded_and_disjoint():
    sets = _select(n_edit=5, n_control=10, seed=3)
    assert (len(sets.edit), len(sets.control)) == (5, 10)
    assert _select(n_edit=5, n_control=10, seed=3) == sets
    assert not {r.subject for r in sets.edit} & {r.subject for r in sets.control}
    probes = sets.probes()
    assert sum(p.kind == "rewrite" for p in probes) == 5 and sum(p.kind == "control" for p in probes) == 10
    terms = set(sets.terms())
    assert all({r.subject, r.target_true, r.target_new} <= terms for r in sets.edit + sets.control)


def test_single_protocol_run_edits_one_fact_of_the_same_selection():
    full = _select(n_edit=4, n_control=6)
    for i in range(4):
        single = _select(n_edit=4, n_control=6, mode="single", single_index=i)
        assert single.edit == [full.edit[i]] and single.control == full.control


def test_controls_only_run_writes_the_pipeline_state_and_the_task_exclusions():
    """Without edits (n_edit 0) the controls are still selected: the state, the summary and the datamodule get
    them; nothing is edited, so no layers, diagnostics or edit timing."""
    datamodule = SimpleNamespace(exclude_terms=[])
    edits = ApplyEdits(n_control=3, known_protocol="none", max_candidates=40, hparams={"layer": 1})
    trainer = SimpleNamespace(callbacks=[edits], datamodule=datamodule)
    pl_module = SimpleNamespace(model=edit_model("llama", 64), tokenizer=None, pipeline=PipelineState())
    edits.on_base_model_ready(trainer, pl_module)
    state = pl_module.pipeline
    assert len(state.sets.control) == 3 and state.sets.edit == [] and state.edited_layers == []
    assert datamodule.exclude_terms == state.sets.terms()
    read = len(load_records("builtin"))
    assert state.stats == {"candidates": 40, "known": 40, "read_records": read, "skipped_records": 0}
    assert list(state.timings) == ["select_s"]
    assert state.edit["editor"] is None and state.edit["hparams"] == {"layer": 1} and state.edit["reused"] == {}
    assert state.edit["control_case_ids"] == [r.case_id for r in state.sets.control]
    assert state.edit["base_fingerprint"] == model_fingerprint(pl_module.model)


def test_rank_shards_cover_every_probe_once():
    for n in (0, 1, 5, 6):
        parts = [shard(n, r, 2) for r in range(2)]
        assert sorted(parts[0] + parts[1]) == list(range(n))


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "single"}, "needs single_index"),
    ({"single_index": 0}, "needs single_index"),
    ({"mode": "single", "single_index": 4, "n_edit": 4}, "single_index=4 must be in 0..3"),
    ({"mode": "parallel"}, "mode 'parallel' unknown"),
    ({"n_edit": -1}, "must be >= 0"),
])
def test_argument_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ApplyEdits(**kwargs)
