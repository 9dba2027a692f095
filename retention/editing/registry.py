"""Editors by name, with their hyperparameters from a preset, a YAML file or a dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retention.editing.alphaedit import AlphaEditEditor
from retention.editing.base import Editor, EditorHParams, resolve_hparams
from retention.editing.ft import FtEditor
from retention.editing.memit import MemitEditor
from retention.editing.rome import RomeEditor

EDITORS: dict[str, tuple[type[Editor], dict[str, Any]]] = {
    "rome": (RomeEditor, {}),
    "memit": (MemitEditor, {}),
    "alphaedit": (AlphaEditEditor, {}),
    "ft-l": (FtEditor, {"variant": "ft-l"}),
    "ft-m": (FtEditor, {"variant": "ft-m"}),
}
"""Name -> (editor class, hyperparameters the name fixes: they replace whatever the preset or file says)."""


def build_editor(
    name: str, hparams: str | Path | dict | EditorHParams | None = None, model_name: str | None = None,
    **overrides: Any,
) -> Editor:
    """An editor with hyperparameters from ``hparams`` (an object, a dict, a YAML path or a preset name), else from
    the preset named after ``model_name`` (``configs/editors/<name>/<model>.yaml``); ``overrides`` replace fields."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; choose from {', '.join(EDITORS)}")
    cls, fixed = EDITORS[name]
    hp = resolve_hparams(cls.hparams_class, name, hparams, model_name)
    data = {**hp.to_dict(), **fixed, **overrides}
    return cls(cls.hparams_class.from_dict(data, source=f"{name} hyperparameters"))
