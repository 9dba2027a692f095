"""The set-up the locate-then-edit editors share (ROME, MEMIT, AlphaEdit), and the context templates.

:class:`LocateThenEditEditor` has one ``prepare`` that builds the :class:`~retention.editing.context.EditorContext`
of a model (located layers, context templates, key covariances, the weights hashed once) and keeps it while the
editor edits that model. :func:`context_templates` generates the short prefixes the v*/z optimiser
(:mod:`retention.editing.targets`) puts before each rewriting prompt.
"""

from __future__ import annotations

import logging
import re
from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import nn
from typing_extensions import override

from retention.arch import unwrap_model
from retention.diskcache import DiskCache
from retention.editing.base import Editor, EditorHParams
from retention.editing.causal_trace import resolve_layers
from retention.editing.context import EditorContext
from retention.editing.covariance import key_covariances
from retention.paths import cache_dir

log = logging.getLogger(__name__)


@torch.no_grad()
def context_templates(
    model: nn.Module | EditorContext, tokenizer, lengths: Sequence[Sequence[int]], seed: int = 0, fingerprint: str | None = None,
) -> list[str]:
    """``["{}"]`` followed by short sampled texts ending in ``". {}"`` (``[length, count]`` pairs), seeded.

    Generated from the end-of-text token with top-5 sampling (as ROME does), then persisted under
    ``cache_dir()/context_templates`` when ``fingerprint`` (the model's) is given, so reruns reuse them exactly.
    """
    spec = {"lengths": [list(map(int, lc)) for lc in lengths], "seed": seed, "start": tokenizer.eos_token}
    entries = DiskCache(cache_dir() / "context_templates")
    key = {"fingerprint": fingerprint, **spec}
    if fingerprint is not None and (hit := entries.get(key)) is not None:
        return list(hit[0]["templates"])
    ctx = EditorContext.of(model, tokenizer)
    base, device = ctx.model, ctx.device
    start = torch.tensor([[tokenizer.eos_token_id]], device=device)
    templates = ["{}"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, count in spec["lengths"]:
            out = base.generate(
                start, attention_mask=torch.ones_like(start), do_sample=True, top_k=5, max_new_tokens=length,
                num_return_sequences=count, pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None,
            )
            for text in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True):
                text = re.sub(r"\s+", " ", text.replace("{", " ").replace("}", " ")).strip()
                templates.append(f"{text}. {{}}")
    if fingerprint is not None:
        entries.put(key, {"templates": templates})
    return templates


class LocateThenEditEditor(Editor):
    """The set-up of the editors that write at located MLP layers from key statistics (ROME, MEMIT, AlphaEdit):
    one :meth:`prepare` for all of them. Their hyperparameters are :class:`TargetHParams` and
    :class:`~retention.editing.covariance.KeyStatsHParams`."""

    def __init__(self, hparams: EditorHParams):
        super().__init__(hparams)
        self.context: EditorContext | None = None
        """The context of the model set up for, made on the first (unedited) model this instance edits and
        reused while it edits that model: a sequential run neither recomputes the context templates and
        covariances after every edit nor looks the located layers up on edited weights."""

    @abstractmethod
    def layer_setting(self) -> Sequence[int] | str:
        """The edited layers as the hyperparameters give them (indices or ``located``)."""

    @property
    def templates(self) -> list[str]:
        """The context templates in use (plain ``"{}"`` first); empty before the first :meth:`prepare`."""
        return self.context.templates if self.context is not None else []

    @override
    def prepare(self, model: nn.Module, tokenizer, fingerprint: str | None = None) -> EditorContext:
        """The editor context of ``model``: the one set up before when it is the same model, else a new one
        holding the layers, the context templates and (``mom2_adjustment``) the key covariances, read from the
        caches keyed by the weights' fingerprint, which is computed once (or is ``fingerprint``, the caller's
        :func:`~retention.models.model_fingerprint` of the unedited model)."""
        base = unwrap_model(model)
        ctx = self.context
        fresh = ctx is None or ctx.model is not base
        if fresh:
            hp = self.hparams
            ctx = EditorContext(base, tokenizer, fingerprint)
            ctx.layers = sorted(set(resolve_layers(self.layer_setting(), base, ctx.fingerprint)))
            ctx.templates = context_templates(ctx, tokenizer, hp.context_templates, hp.context_seed, ctx.fingerprint)
            if hp.mom2_adjustment:
                ctx.covs = key_covariances(base, tokenizer, ctx.layers, hp.covariance_spec(), ctx.fingerprint)
            else:
                log.info("%s: mom2_adjustment is off: C = I", self.name)
        ctx.tokenizer = tokenizer
        self._set_up(ctx, fresh)
        self.context = ctx
        return ctx

    def _set_up(self, ctx: EditorContext, fresh: bool) -> None:
        """Editor-specific set-up after :meth:`prepare` (``fresh``: a model this instance had not set up for)."""
