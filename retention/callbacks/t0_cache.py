"""The t=0 measurement shared between runs that measure the same edited model (a study's arms that differ only
after editing), cached on disk (:class:`~retention.diskcache.DiskCache`, kind ``t0``).

An entry is keyed by the edited model, the tokenizer, the probes, the :class:`ScoreSettings` (every field), the
device and :data:`T0_CACHE_VERSION`. The edited model is named without hashing all its weights again: the base
model's weight fingerprint (which ApplyEdits computed), what the edit was (editor, resolved hyperparameters, mode,
an edit made earlier), and a hash of the tensors the edit can have changed: those of the layers it edited
(parameters and buffers, the non-persistent ones of a memory editor's module too) and those outside the decoder
layers (embeddings, final norm, head: where an ``edited_model`` may differ too). An entry holds every per-probe
result and the rates, so a reused t=0 is the measurement that run made, probe for probe; floats are stored
exactly (as hex: NaN and infinities included). Its ``seconds`` are those of the lookup (what this run spent on
t=0); the run summary's ``t0_reused`` says it was reused.

Only runs on one process share: a rank's shard of the probes depends on the world size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from retention.arch import ArchAdapter, unwrap_model
from retention.callbacks.probing import ScoreSettings, measure
from retention.diskcache import DiskCache, digest
from retention.distributed import rank_and_world
from retention.paths import cache_dir
from retention.pipeline_contract import Measurement, PipelineState
from retention.records import Probe
from retention.scoring import ProbeResult

log = logging.getLogger(__name__)

T0_CACHE_VERSION = 1
"""Bump when scoring changes what it computes, so cached t=0 measurements are measured again."""
_EDIT_FIELDS = ("base_fingerprint", "editor", "hparams", "mode", "precomputed", "edited_model")
"""What :attr:`PipelineState.edit` says of the edit itself (not how long it took or whether it was reused)."""


def edited_tensors_digest(model: nn.Module, layers: Sequence[int]) -> str:
    """A hash of the tensors an edit of ``layers`` can change: every parameter and buffer of those decoder
    layers and outside the decoder layers."""
    base = unwrap_model(model)
    arch = ArchAdapter.for_model(base)
    h = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted([*base.named_parameters(), *base.named_buffers()], key=lambda item: item[0]):
        if (i := arch.layer_index_of(name)) is not None and i not in layers:
            continue
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def t0_key(model: nn.Module, tokenizer, probes: Sequence[Probe], settings: ScoreSettings,
           pipeline: PipelineState) -> dict | None:
    """The cache key of the t=0 measurement of ``probes`` on the edited ``model``; None when it is not shared
    (several processes, or no base fingerprint from ApplyEdits)."""
    if rank_and_world()[1] != 1 or not pipeline.edit.get("base_fingerprint"):
        return None
    device = next(unwrap_model(model).parameters()).device
    return {
        "version": T0_CACHE_VERSION,
        "edit": {f: pipeline.edit.get(f) for f in _EDIT_FIELDS},
        "edited_layers": sorted(pipeline.edited_layers),
        "tensors": edited_tensors_digest(model, pipeline.edited_layers),
        "tokenizer": [type(tokenizer).__name__, len(tokenizer), tokenizer.padding_side],
        "probes": digest([dataclasses.asdict(p) for p in probes]),
        "settings": dataclasses.asdict(settings),
        "device": [device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else "",
                   torch.__version__],
    }


def _encode(obj: Any) -> Any:
    """``obj`` with every float as ``{"float": hex}`` (exact, NaN and infinities included)."""
    if isinstance(obj, float):
        return {"float": obj.hex()}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        return float.fromhex(obj["float"]) if obj.keys() == {"float"} else {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _stored(m: Measurement, results: Sequence[ProbeResult]) -> dict:
    rows = [{f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "probe"} for r in results]
    return _encode({"rates": m.rates, "seconds": m.seconds, "results": rows})


def _restored(payload: dict, probes: Sequence[Probe], seconds: float) -> tuple[Measurement, list[ProbeResult]]:
    data = _decode(payload)
    if len(data["results"]) != len(probes):
        raise ValueError(f"{len(data['results'])} results for {len(probes)} probes")
    results = [ProbeResult(probe, **row) for probe, row in zip(probes, data["results"])]
    return Measurement(0, data["rates"], seconds, list(results)), results


def measure_t0(model: nn.Module, tokenizer, probes: Sequence[Probe], settings: ScoreSettings,
               pipeline: PipelineState) -> tuple[Measurement, list[ProbeResult]]:
    """:func:`~retention.callbacks.probing.measure` at step 0, or the measurement an earlier run made of the
    same edited model, probes and settings (``pipeline.stats["t0_reused"]`` says which). Runs started together
    measure it once: the others wait for it (:meth:`DiskCache.lock`)."""
    t0 = time.perf_counter()
    key = t0_key(model, tokenizer, probes, settings, pipeline)
    if key is None:
        pipeline.stats["t0_reused"] = 0
        return measure(model, tokenizer, probes, settings, 0)
    store = DiskCache(cache_dir() / "t0")
    with store.lock(key):
        hit = store.get(key)
        if hit is not None:
            try:
                m, results = _restored(hit[0], probes, time.perf_counter() - t0)
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                log.warning("t=0 cache entry %s ignored (%s); measuring", store.data_path(key, ".json"), err)
            else:
                pipeline.stats["t0_reused"] = 1
                log.info("t=0 reused: measured by an earlier run of the same edited model in %.1f s",
                         _decode(hit[0]["seconds"]))
                return m, results
        m, results = measure(model, tokenizer, probes, settings, 0)
        store.put(key, _stored(m, results))
    pipeline.stats["t0_reused"] = 0
    return m, results
