"""Measuring the edit and control sets of a run: probes, rank shards, the count metric, gathering.

Each rank scores its own shard of the probes (``retention.distributed.shard``: no padding, no repeats, unlike the
distributed sampler) and updates one :class:`~retention.metrics.ProbeCounts`, whose ``compute()`` sums the counts
over ranks with one all-reduce. Under DDP each rank scores on its own replica. A model sharded with FSDP2
all-gathers its weights in every forward, so there every rank must run the same forwards: shorter shards are
topped up with probes whose results are dropped, and generation runs a fixed number of steps
(``retention.scoring.greedy_generate``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from retention.distributed import (
    gather_shards,
    gathered_root,
    is_sharded,
    rank_and_world,
    shard,
    state_device,
)
from retention.metrics import ProbeCounts
from retention.pipeline_contract import Measurement, ScoreSettings
from retention.records import Probe, probe_group
from retention.scoring import ProbeResult, score_probes


def score_shard(model: nn.Module, tokenizer, probes: Sequence[Probe], settings: ScoreSettings) -> list[ProbeResult]:
    """Results of this rank's shard of ``probes`` (in shard order)."""
    rank, world = rank_and_world()
    mine = shard(len(probes), rank, world)
    n = len(mine)
    if is_sharded(model):
        # Every rank scores as many probes as rank 0 (the longest shard): the same number of batches, hence of
        # collective forwards. The top-up repeats probe 0 and its results are dropped.
        mine += [0] * (len(shard(len(probes), 0, world)) - n)
    with gathered_root(model):
        results = score_probes(model, tokenizer, [probes[i] for i in mine], protocols=settings.protocols,
                               batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                               precision=settings.precision)
    return results[:n]


def outcomes(
    baseline: Sequence[ProbeResult], now: Sequence[ProbeResult], groups: Sequence[str], protocols: Sequence[str]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The arguments of :meth:`ProbeCounts.update <retention.metrics.ProbeCounts.update>` for the probes of
    ``now`` and their ``baseline`` (t=0) results: group indices, outcomes at t=0 and now, and which protocols
    scored each probe (``prob`` needs an alternative)."""
    index = {g: i for i, g in enumerate(groups)}
    group = torch.tensor([index[probe_group(r.probe.kind)] for r in now], dtype=torch.long)
    shape = (len(now), len(protocols))
    before, after = (torch.tensor([[r.passed.get(p, False) for p in protocols] for r in results],
                                  dtype=torch.bool).reshape(shape) for results in (baseline, now))
    scored = torch.tensor([[p in r.passed for p in protocols] for r in now], dtype=torch.bool).reshape(shape)
    return group, before, after, scored


def measure(
    model: nn.Module,
    tokenizer,
    probes: Sequence[Probe],
    settings: ScoreSettings,
    step: int,
    baseline: Sequence[ProbeResult] | None = None,
) -> tuple[Measurement, list[ProbeResult]]:
    """Score this rank's shard, sync the metrics, gather the results on rank 0.

    Returns the measurement and this rank's local results (the baseline of later measurements). Without a
    ``baseline`` this is t=0 and retention is measured against the results themselves.
    """
    t0 = time.perf_counter()
    local = score_shard(model, tokenizer, probes, settings)
    groups = list(dict.fromkeys(probe_group(p.kind) for p in probes))
    counts = ProbeCounts(groups, settings.protocols).to(state_device(model))
    counts.update(*outcomes(local if baseline is None else baseline, local, groups, settings.protocols))
    rates = counts.rates()
    results = gather_shards(local, len(probes))
    rank, _ = rank_and_world()
    return Measurement(step, rates, time.perf_counter() - t0, results if rank == 0 else None), local
