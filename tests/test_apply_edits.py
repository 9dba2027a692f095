"""ApplyEdits without a model: selection, the single protocol's run index, task exclusion terms, argument errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from retention.callbacks.apply_edits import ApplyEdits
from retention.callbacks.probing import shard
from retention.data.selection import KnowledgeSets


def _select(**kw) -> KnowledgeSets:
    return ApplyEdits(known_protocol="none", **kw).select(pl_module=None)


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


def test_exclusion_terms_reach_the_datamodule():
    datamodule = SimpleNamespace(exclude_terms=[])
    edits = ApplyEdits(n_edit=2, n_control=2, known_protocol="none")
    edits.sets = edits.select(None)
    edits._exclude_from_task(SimpleNamespace(datamodule=datamodule))
    assert datamodule.exclude_terms == edits.sets.terms()


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
