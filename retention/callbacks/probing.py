"""Measuring the edit and control sets of a run: probes, rank shards, torchmetrics states, gathering.

Each rank scores its own shard of the probes (indices ``rank, rank + world, ...``: no padding, no repeats,
unlike the distributed sampler) and updates count metrics that ``compute()`` sums over ranks. Under DDP each
rank scores on its own replica. A model sharded with FSDP2 all-gathers its weights in every forward, so there
every rank must run the same forwards: shorter shards are topped up with probes whose results are dropped, and
generation runs a fixed number of steps (``retention.scoring.greedy_generate``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from retention.metrics import EditSuccess, Retention
from retention.records import KnowledgeRecord, Probe
from retention.reporting import Rate, probe_group, rate
from retention.scoring import ProbeResult, check_protocols, gathered_root, is_sharded, score_probes


@dataclass
class KnowledgeSets:
    """The facts of a run: the edit set E (edited to ``target_new``) and the intrinsic control set I."""

    edit: list[KnowledgeRecord] = field(default_factory=list)
    control: list[KnowledgeRecord] = field(default_factory=list)

    def probes(self) -> list[Probe]:
        """Edit probes (rewrite, paraphrase, neighbourhood) of E, then true-fact probes of I."""
        probes = [p for r in self.edit for p in r.edit_probes()]
        return probes + [p for r in self.control for p in r.true_probes("control")]

    def terms(self) -> list[str]:
        """Subjects and objects (true and new) of both sets: what task data must not mention."""
        return sorted({t for r in self.edit + self.control for t in (r.subject, r.target_true, r.target_new)})


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> list[int]:
    """This rank's indices of ``n`` items: disjoint across ranks, together exactly ``range(n)``."""
    return list(range(rank, n, world))


@dataclass
class ScoreSettings:
    protocols: tuple[str, ...] = ("top1", "prob", "gen")
    batch_size: int = 16
    max_new_tokens: int = 10


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
                               batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens)
    return results[:n]


def gather(local: Sequence[ProbeResult], n: int) -> list[ProbeResult]:
    """All ``n`` results in probe order, from every rank's shard (a collective: every rank calls it)."""
    rank, world = rank_and_world()
    if world == 1:
        return list(local)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(local))
    out: list = [None] * n
    for r, part in enumerate(parts):
        for i, res in zip(shard(n, r, world), part):
            out[i] = res
    return out


def _metric_device(model: nn.Module) -> torch.device:
    """Where metric states live: the rank's GPU under NCCL (which cannot reduce CPU tensors, and t=0 is
    measured before the strategy moves the model), else the model's device."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return next(model.parameters()).device


class ProbeMetrics:
    """Accuracy (``EditSuccess``) and retention vs t=0 (``Retention``) per probe group and protocol."""

    def __init__(self, groups: Sequence[str], protocols: Sequence[str], device: torch.device | str = "cpu"):
        self.groups = list(dict.fromkeys(groups))
        self.protocols = check_protocols(protocols)
        # States live on the model's device: NCCL cannot all-reduce CPU tensors.
        self.accuracy = {(g, p): EditSuccess().to(device) for g in self.groups for p in self.protocols}
        self.retention = {(g, p): Retention().to(device) for g in self.groups for p in self.protocols}

    def update(self, baseline: Sequence[ProbeResult], now: Sequence[ProbeResult]) -> None:
        """Add one rank's shard: ``baseline`` (t=0) and ``now`` results of the same probes."""
        for (g, p), acc in self.accuracy.items():
            pairs = [(b, a) for b, a in zip(baseline, now) if probe_group(a.probe.kind) == g and p in a.passed]
            acc.update([a.passed[p] for _, a in pairs])
            self.retention[(g, p)].update([b.passed[p] for b, _ in pairs], [a.passed[p] for _, a in pairs])

    def compute(self) -> dict[str, dict[str, dict[str, Rate]]]:
        """``{"accuracy"|"retention": {group: {protocol: Rate}}}`` summed over ranks; every rank must call it."""
        out: dict[str, dict[str, dict[str, Rate]]] = {"accuracy": {}, "retention": {}}
        for name, metrics in (("accuracy", self.accuracy), ("retention", self.retention)):
            for (g, p), metric in metrics.items():
                out[name].setdefault(g, {})[p] = rate(*metric.counts())
        for metric in (*self.accuracy.values(), *self.retention.values()):
            metric.reset()
        return out


@dataclass
class Measurement:
    """One measurement of the probe sets: rates (all ranks) and per-probe results (rank 0 only)."""

    step: int
    rates: dict[str, dict[str, dict[str, Rate]]]
    seconds: float
    results: list[ProbeResult] | None = None

    def to_dict(self) -> dict:
        return {"step": self.step, "seconds": self.seconds, **self.rates}


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
    metrics = ProbeMetrics([probe_group(p.kind) for p in probes], settings.protocols, _metric_device(model))
    metrics.update(local if baseline is None else baseline, local)
    rates = metrics.compute()
    results = gather(local, len(probes))
    rank, _ = rank_and_world()
    return Measurement(step, rates, time.perf_counter() - t0, results if rank == 0 else None), local
