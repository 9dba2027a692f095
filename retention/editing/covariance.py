"""Second-moment statistics of editing keys: C = E[k kᵀ] of a layer's MLP-output-projection input over a corpus.

Keys are collected from windows of ``max_length`` tokens of a text corpus (:mod:`retention.corpus`: ``builtin``,
the project's built-in prose corpus; ``wikitext2``, the shared WikiText-2 test split; ``hf:<id>[:config]``, a
Hugging Face dataset's ``train`` split, ``text`` field, streamed, needing ``retention[hf]`` and a network; or a
text file; the hyperparameters may name a list, resolved to its first readable spec before any model is loaded),
with each forward stopped right after the deepest layer needed. C is accumulated in float64 and cached on disk
(:class:`~retention.diskcache.DiskCache`) under ``cache_dir()/covariance/<weights hash>``, keyed by the model's
weights hash, its name, the layer, the corpus (its content hash and, for a file, its name: ``wikitext2`` and the
path of the same file share entries), the sample count, the window length and the dtype; an entry that fails its
check is recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from retention.arch import ArchAdapter, unwrap_model
from retention.corpus import BUILTIN, corpus_specs, resolve_corpus
from retention.corpus import corpus_text as read_corpus
from retention.diskcache import DiskCache
from retention.editing.base import EditorHParams
from retention.editing.trace import capture, stop_after
from retention.models import model_fingerprint
from retention.paths import cache_dir

log = logging.getLogger(__name__)

_VERSION = 1
"""Bump when the way statistics are computed changes, so cached files are recomputed."""


@dataclass(frozen=True)
class CovarianceSpec:
    """Which keys the statistics are taken over."""

    corpus: str = "builtin"
    """A corpus spec (:mod:`retention.corpus`): ``builtin``, ``wikitext2``, ``hf:<id>[:config]`` or a text file."""
    samples: int = 1000
    """Number of token windows."""
    max_length: int = 128
    """Tokens per window (the cap that keeps long-context models from running out of memory)."""
    batch_size: int = 8

    def __post_init__(self):
        for name in ("samples", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"covariance {name}={getattr(self, name)}: must be >= 1")


@dataclass
class KeyStatsHParams(EditorHParams):
    """The key-statistics fields shared by ROME, MEMIT and AlphaEdit (names as in their code)."""

    mom2_adjustment: bool = True
    """Use the key covariance C; false is the named ``C = I`` fallback."""
    mom2_corpus: str | list[str] = BUILTIN
    """Corpus of the key statistics (:mod:`retention.corpus`): ``builtin``, ``wikitext2``, ``hf:<id>[:config]`` or a
    text file (in a preset or hyperparameter file, a relative path is relative to that file), or a list of them in
    order of preference. :meth:`resolve` replaces it by the first that can be read here (a warning names each one
    skipped), so the recorded hyperparameters say which was used; none readable is an error before any model is
    loaded. Not checked when ``mom2_adjustment`` is off."""
    mom2_samples: int = 1000
    """Token windows of the key statistics."""
    mom2_max_length: int = 128
    """Tokens per window."""

    path_fields: ClassVar[tuple[str, ...]] = ("mom2_corpus",)

    def validate(self) -> None:
        super().validate()
        specs = corpus_specs(self.mom2_corpus, "mom2_corpus")
        CovarianceSpec(specs[0], self.mom2_samples, self.mom2_max_length)

    def resolve(self) -> None:
        super().resolve()
        if self.mom2_adjustment:
            self.mom2_corpus = resolve_corpus(self.mom2_corpus, "mom2_corpus")

    def covariance_spec(self) -> CovarianceSpec:
        corpus = self.mom2_corpus
        if not isinstance(corpus, str):  # made unresolved (base.unresolved) and used as it is
            corpus = resolve_corpus(corpus, "mom2_corpus")
        return CovarianceSpec(corpus, self.mom2_samples, self.mom2_max_length)


def corpus_text(corpus: str, min_chars: int) -> tuple[str, str]:
    """The corpus text (at least ``min_chars`` when available) and an identity string for cache keys
    (:func:`retention.corpus.corpus_text`)."""
    return read_corpus(corpus, min_chars, what="mom2_corpus")


def _windows(tokenizer, text: str, spec: CovarianceSpec) -> torch.Tensor:
    """``[n, max_length]`` token windows of the corpus, each starting with the tokenizer's own special prefix."""
    head = tokenizer("")["input_ids"]
    body = spec.max_length - len(head)
    need = spec.samples * body
    ids: list[int] = []
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    for i in range(0, len(paragraphs), 64):
        block = "\n\n".join(paragraphs[i : i + 64]) + "\n\n"
        ids += tokenizer(block, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    n = min(spec.samples, len(ids) // body)
    if n == 0:
        raise ValueError(f"covariance corpus {spec.corpus!r} has fewer than {body} tokens")
    if n < spec.samples:
        log.warning("covariance corpus %s gives only %d of %d windows of %d tokens", spec.corpus, n, spec.samples,
                    spec.max_length)
    windows = torch.tensor(ids[: n * body]).view(n, body)
    return torch.cat([torch.tensor(head, dtype=torch.long).expand(n, -1), windows], 1)


def _cache_key(model: nn.Module, fingerprint: str, layer: int, corpus_id: str, spec: CovarianceSpec) -> dict:
    base = unwrap_model(model)
    return {
        "version": _VERSION, "model": str(getattr(base.config, "_name_or_path", "")) or type(base).__name__,
        "fingerprint": fingerprint, "layer": layer, "module": ArchAdapter.for_model(base).mlp_out_name(layer),
        "corpus": corpus_id, "samples": spec.samples, "max_length": spec.max_length,
        "dtype": str(next(base.parameters()).dtype),
    }


@torch.no_grad()
def _compute(model: nn.Module, tokenizer, layers: Sequence[int], windows: torch.Tensor,
             spec: CovarianceSpec) -> tuple[dict[int, torch.Tensor], int]:
    adapter = ArchAdapter.for_model(model)
    device = adapter.embed.weight.device
    modules = {i: adapter.mlp_out(i) for i in layers}
    sums: dict[int, torch.Tensor] = {}
    tokens = 0
    t0 = last = time.perf_counter()
    for start in range(0, len(windows), spec.batch_size):
        batch = windows[start : start + spec.batch_size].to(device)
        with capture(modules, outputs=False) as rec, stop_after(modules[max(layers)]):
            model(input_ids=batch, use_cache=False)
        for i in layers:
            k = rec[i].input.reshape(-1, rec[i].input.shape[-1]).to(torch.float64)
            sums[i] = sums[i] + k.T @ k if i in sums else k.T @ k
        tokens += batch.numel()
        done = min(start + spec.batch_size, len(windows))
        if time.perf_counter() - last > 10 or done == len(windows):
            last = time.perf_counter()
            log.info("covariance of layer(s) %s: %d/%d windows, %d tokens, %.0f s", list(layers), done,
                     len(windows), tokens, last - t0)
    return {i: (s / tokens).cpu() for i, s in sums.items()}, tokens


def key_covariances(
    model: nn.Module, tokenizer, layers: Sequence[int], spec: CovarianceSpec, fingerprint: str | None = None,
    cache: bool = True,
) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] (float64, ``[in, in]``) of the MLP-output-projection keys of each of ``layers``.

    Layers missing from the cache are computed together in one pass over the corpus.
    """
    base = unwrap_model(model)
    adapter = ArchAdapter.for_model(base)
    layers = sorted({i % adapter.num_layers for i in layers})
    t0 = time.perf_counter()
    text, corpus_id = corpus_text(spec.corpus, min_chars=spec.samples * spec.max_length * 8)
    fingerprint = fingerprint or model_fingerprint(base)
    entries = DiskCache(cache_dir() / "covariance" / fingerprint)
    keys = {i: _cache_key(base, fingerprint, i, corpus_id, spec) for i in layers}
    with entries.lock(*keys.values()) if cache else nullcontext():  # runs started together compute them once
        out = {i: hit[1]["C"] for i in layers if cache and (hit := entries.get(keys[i])) is not None}
        missing = [i for i in layers if i not in out]
        if missing:
            was_training = base.training
            base.eval()
            computed, tokens = _compute(base, tokenizer, missing, _windows(tokenizer, text, spec), spec)
            base.train(was_training)
            for i, c in computed.items():
                if cache:
                    entries.put(keys[i], {"tokens": tokens}, {"C": c})
                out[i] = c
            log.info("covariance of layer(s) %s over %d tokens of %s in %.1f s", missing, tokens, spec.corpus,
                     time.perf_counter() - t0)
    return out

