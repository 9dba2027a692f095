"""Metrics: the functional core against hand counts, the Metric classes against it on 1 and 2 gloo ranks."""

from __future__ import annotations

import math
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from retention.metrics import EditSuccess, FlipRatio, Retention, edit_success, flip_ratio, ratio, retention

BEFORE = [True, True, False, True, False, True, True]
AFTER = [True, False, True, True, False, False, True]


def test_functional_counts():
    assert [int(x) for x in edit_success(BEFORE)] == [5, 7]
    assert [int(x) for x in retention(BEFORE, AFTER)] == [3, 5]  # kept only where passing before
    assert flip_ratio(BEFORE, AFTER) == pytest.approx(2 / 5)
    assert math.isnan(ratio(0, 0))
    assert math.isnan(flip_ratio([False], [True]))
    with pytest.raises(ValueError, match="before has 2 outcomes, after has 1"):
        retention([True, False], [True])


def test_metric_classes_accumulate_over_updates():
    ret, flip, ok = Retention(), FlipRatio(), EditSuccess()
    for lo, hi in ((0, 3), (3, 7)):
        ret.update(BEFORE[lo:hi], AFTER[lo:hi])
        flip.update(BEFORE[lo:hi], AFTER[lo:hi])
        ok.update(AFTER[lo:hi])
    assert ret.compute().item() == pytest.approx(3 / 5) and ret.counts() == (3, 5)
    assert flip.compute().item() == pytest.approx(2 / 5)
    assert ok.compute().item() == pytest.approx(4 / 7) and ok.counts() == (4, 7)
    ret.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert ret.counts() == (0, 0) and math.isnan(ret.compute().item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Uneven shards, no padding: rank 0 gets 4 outcomes, rank 1 gets 3.
        shard = list(range(rank, len(BEFORE), world))
        ret, flip, ok = Retention(), FlipRatio(), EditSuccess()
        ret.update([BEFORE[i] for i in shard], [AFTER[i] for i in shard])
        flip.update([BEFORE[i] for i in shard], [AFTER[i] for i in shard])
        ok.update([AFTER[i] for i in shard])
        # Every rank computes (computing on one rank only would deadlock).
        out[rank] = (ret.compute().item(), ret.counts(), flip.compute().item(), ok.counts())
        # Local states are restored after the sync, so updates keep accumulating per rank.
        assert ret.kept.item() == sum(BEFORE[i] and AFTER[i] for i in shard)
    finally:
        dist.destroy_process_group()


def test_metrics_on_two_gloo_ranks_match_the_reference():
    out = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
    kept, den = (int(x) for x in retention(BEFORE, AFTER))
    passed, total = (int(x) for x in edit_success(AFTER))
    for rank in (0, 1):
        value, counts, flip, ok_counts = out[rank]
        assert counts == (kept, den) and value == pytest.approx(kept / den)
        assert flip == pytest.approx(flip_ratio(BEFORE, AFTER))
        assert ok_counts == (passed, total)
