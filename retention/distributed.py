"""The collectives of the measurement code in one place: rank checks, rank shards, the all-reduce that syncs
metric states and the gathering of per-probe results.

Without an initialised process group everything here is the one-process case: rank 0 of 1, no communication.
Every function that communicates is a collective: every rank must call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """Whether a process group is initialised (then the functions below communicate)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def shard(n: int, rank: int, world: int) -> list[int]:
    """This rank's indices of ``n`` items (``rank, rank + world, ...``): disjoint across ranks, together exactly
    ``range(n)``; no padding and no repeats, unlike the distributed sampler."""
    return list(range(rank, n, world))


def all_reduce_sum(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """The sum of ``tensor`` over ranks with one all-reduce, as torchmetrics' ``dist_sync_fn`` returns it: a
    list whose sum (the ``"sum"`` reduction of the stacked list) is the total.

    torchmetrics' default sync gathers every state from every rank (a barrier and an all-gather per state);
    for states reduced by ``sum`` one all-reduce of each gives the same totals.
    """
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return [total]


def gather_shards(local: Sequence[Any], n: int) -> list[Any]:
    """All ``n`` items in order, from every rank's shard (:func:`shard`) of them, on every rank (one
    ``all_gather_object``); ``local`` itself on one process."""
    rank, world = rank_and_world()
    if world == 1:
        return list(local)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(local))
    out: list = [None] * n
    for r, part in enumerate(parts):
        for i, item in zip(shard(n, r, world), part):
            out[i] = item
    return out


def state_device(model: nn.Module) -> torch.device:
    """Where the metric states of a model's measurement live: the rank's GPU under NCCL (which cannot reduce CPU
    tensors, and t=0 is measured before the strategy moves the model), else the model's device."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return next(model.parameters()).device


def is_sharded(model: nn.Module) -> bool:
    """Whether the model holds FSDP2 shards (DTensors): then every forward is a collective of all ranks."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def gathered_root(model: nn.Module) -> Iterator[None]:
    """With an FSDP2 root, its own weights (embeddings, final norm, LM head) gathered for the duration: scoring
    calls the decoder and the head past the root's forward (each decoder layer still gathers its own)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
