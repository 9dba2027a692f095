"""The editor context: what one editor call needs of the model, made once and handed to every piece of the call.

An editor entry point used to unwrap the model, rebuild its :class:`~retention.arch.ArchAdapter` in every helper
it called, and hash every weight (:func:`retention.models.model_fingerprint`, the cache key of context templates,
key covariances and located layers) once per cache it read — seconds at 135M parameters, minutes at 8B. An
:class:`EditorContext` does each once: the helpers of :mod:`retention.editing.targets` and
:mod:`retention.editing.memit` take one in place of the model (or build one from a plain model), and the
locate-then-edit editors keep theirs — with the layers, context templates and covariances of their set-up — for
as long as they edit the same model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from retention.arch import ArchAdapter, unwrap_model
from retention.models import model_fingerprint


class EditorContext:
    """The unwrapped model, its adapter and the tokenizer; the weights' fingerprint, computed at most once; and
    the set-up of a locate-then-edit editor (filled by its ``prepare``): the edited layers, the context templates
    and the key covariances per layer."""

    def __init__(self, model: nn.Module, tokenizer: Any, fingerprint: str | None = None):
        self.model = unwrap_model(model)
        self.adapter = ArchAdapter.for_model(self.model)
        self.tokenizer = tokenizer
        self.layers: list[int] = []
        """The edited layers, ascending."""
        self.templates: list[str] = []
        """The context templates (plain ``"{}"`` first)."""
        self.covs: dict[int, torch.Tensor] = {}
        """Layer -> C = E[k kᵀ] of its MLP-out keys (empty: C = I, ``mom2_adjustment: false``)."""
        self._fingerprint = fingerprint
        """The caller's fingerprint of these very weights, when it has one already."""

    @classmethod
    def of(cls, model: nn.Module | EditorContext, tokenizer: Any) -> EditorContext:
        """``model`` itself when it is a context already, else a new context for it."""
        return model if isinstance(model, EditorContext) else cls(model, tokenizer)

    @property
    def fingerprint(self) -> str:
        """:func:`~retention.models.model_fingerprint` of the model as it was when first asked for."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (its embedding's device)."""
        return self.adapter.embed.weight.device
