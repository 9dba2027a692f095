"""Metrics: the functional core against hand counts, ProbeCounts against it, and a measurement on 2 gloo ranks:
one all-reduce per measurement, and the counts of one process."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retention.metrics import COUNTS, ProbeCounts, count_rates, flip_ratio, probe_counts, rate, ratio

BEFORE = [True, True, False, True, False, True, True]
AFTER = [True, False, True, True, False, False, True]
GROUP = [0, 1, 0, 0, 1, 1, 0]
"""Two groups: probes 0, 2, 3, 6 and probes 1, 4, 5."""
SCORED = [[True, True], [True, True], [True, True], [True, False], [True, True], [True, False], [True, True]]
"""Two protocols; the second has no outcome for probes 3 and 5 (as ``prob`` without an alternative)."""


def _columns(protocols: int = 2) -> tuple[torch.Tensor, ...]:
    """GROUP, BEFORE, AFTER, SCORED as ``probe_counts`` arguments; protocol 1 has the outcomes reversed."""
    before = torch.tensor([BEFORE, BEFORE[::-1]]).T[:, :protocols]
    after = torch.tensor([AFTER, AFTER[::-1]]).T[:, :protocols]
    return torch.tensor(GROUP), before, after, torch.tensor(SCORED)[:, :protocols]


def _hand_counts(group: int, protocol: int) -> list[int]:
    """COUNTS of one group and protocol, counted one probe at a time."""
    _, before, after, scored = (t.tolist() for t in _columns())
    rows = [(b[protocol], a[protocol]) for g, b, a, s in zip(GROUP, before, after, scored) if g == group and s[protocol]]
    return [len(rows), sum(a for _, a in rows), sum(b for b, _ in rows), sum(b and a for b, a in rows)]


def test_probe_counts_match_hand_counts():
    counts = probe_counts(*_columns(), n_groups=2)
    assert counts.shape == (len(COUNTS), 2, 2) and counts.dtype == torch.long
    for g in (0, 1):
        for p in (0, 1):
            assert counts[:, g, p].tolist() == _hand_counts(g, p)
    # Group 0, protocol 0: probes 0, 2, 3, 6 pass before as T F T T and after as T T T T.
    assert counts[:, 0, 0].tolist() == [4, 4, 3, 3]


def test_rates_carry_count_and_denominator():
    rates = count_rates(probe_counts(*_columns(), n_groups=2), ["a", "b"], ["top1", "prob"])
    assert list(rates) == ["accuracy", "retention"] and list(rates["retention"]) == ["a", "b"]
    assert rates["accuracy"]["a"]["top1"] == {"value": 1.0, "count": 4, "denominator": 4}
    # Group b, protocol top1: probes 1, 4, 5 pass before as T F T and after as F F F.
    assert rates["retention"]["b"]["top1"] == rate(0, 2)
    assert flip_ratio(rates["retention"]["b"]["top1"]) == 1.0
    assert flip_ratio(rates["retention"]["a"]["top1"]) == pytest.approx(0.0)
    assert math.isnan(ratio(0, 0)) and math.isnan(flip_ratio(rate(0, 0)))
    with pytest.raises(ValueError, match=r"before \(7, 2\), after \(7, 1\)"):
        probe_counts(torch.tensor(GROUP), _columns()[1], _columns(1)[2], torch.tensor(SCORED), n_groups=2)


def test_probe_counts_metric_accumulates_over_updates():
    group, before, after, scored = _columns()
    metric = ProbeCounts(["a", "b"], ["top1", "prob"])
    for lo, hi in ((0, 3), (3, 7)):
        metric.update(group[lo:hi], before[lo:hi], after[lo:hi], scored[lo:hi])
    metric.update(group[:0], before[:0], after[:0], scored[:0])  # an empty shard adds nothing
    assert torch.equal(metric.compute(), probe_counts(group, before, after, scored, 2))
    assert metric.rates() == count_rates(probe_counts(group, before, after, scored, 2), ["a", "b"], ["top1", "prob"])
    metric.reset()
    assert not metric.counts.any()


COLLECTIVES = ("all_reduce", "all_gather", "barrier", "broadcast", "reduce", "all_gather_object")
"""The ``torch.distributed`` functions counted during a measurement (torchmetrics' default sync calls
``barrier`` and ``all_gather`` for every state)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probes():
    from retention.callbacks.apply_edits import ApplyEdits

    return ApplyEdits(known_protocol="none", n_edit=3, n_control=4).select(pl_module=None).sets.probes()


def _later(results, probes):
    """A later measurement's results: every third outcome (by probe and protocol, not by rank shard) flipped."""
    index = {p: i for i, p in enumerate(probes)}
    return [dataclasses.replace(r, passed={p: v != ((index[r.probe] + j) % 3 == 0) for j, (p, v) in
                                           enumerate(r.passed.items())}) for r in results]


def _measure_twice(out: dict, rank: int) -> None:
    """t=0, then a measurement against it, counting the collectives each makes."""
    from retention.callbacks.probing import ScoreSettings, measure
    from retention.models import load_model

    calls: collections.Counter = collections.Counter()

    def counting(name: str):
        collective = getattr(dist, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return collective(*args, **kwargs)

        return counted

    for name in COLLECTIVES:  # in this process only: a spawned rank, or the reference run (restored after it)
        setattr(dist, name, counting(name))
    model, tokenizer = load_model("tiny-llama")
    probes, settings = _probes(), ScoreSettings(("top1", "prob", "token_acc", "gen"), 8, 3)
    t0, local = measure(model, tokenizer, probes, settings, 0)
    first = dict(calls)
    calls.clear()
    later, _ = measure(model, tokenizer, probes, settings, 2, baseline=_later(local, probes))
    out[rank] = (first, dict(calls), t0.rates, later.rates)


def _rank_main(rank: int, world: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _measure_twice(out, rank)
    finally:
        dist.destroy_process_group()


def test_a_measurement_on_two_gloo_ranks_is_one_all_reduce_and_the_counts_of_one_process(monkeypatch):
    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, getattr(dist, name))  # restored after the reference run below
    out = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
    reference: dict = {}
    _measure_twice(reference, 0)
    _, _, t0, later = reference[0]
    assert t0["accuracy"]["edit"]["prob"]["denominator"] == 3  # 3 edits, one rewrite probe each
    assert later["retention"] != t0["retention"]  # the flipped baseline moves retention
    for rank in (0, 1):
        first, second, rank_t0, rank_later = out[rank]
        # The metric states: one all-reduce; the per-probe results for the report: one all_gather_object.
        assert first == second == {"all_reduce": 1, "all_gather_object": 1}
        assert json.dumps([rank_t0, rank_later]) == json.dumps([t0, later])  # NaN (empty denominators) included
