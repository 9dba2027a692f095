"""Editors by name, with their hyperparameters from a preset, a YAML file or a dict."""

from __future__ import annotations

import importlib
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


def editor_class(name: str) -> tuple[type[Editor], dict[str, Any]]:
    """The editor class a name selects, with the hyperparameters the name fixes: one of :data:`EDITORS`, or the
    import path of any :class:`Editor` subclass (``package.module.Class`` or ``package.module:Class``)."""
    if name in EDITORS:
        return EDITORS[name]
    module_name, sep, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    if not sep or not module_name:
        raise ValueError(f"unknown editor {name!r}; choose from {', '.join(EDITORS)} or give the import path of an "
                         "Editor subclass (package.module.Class)")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"editor {name!r}: cannot import {attr!r} from {module_name!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Editor)):
        raise ValueError(f"editor {name!r} is not a subclass of retention.editing.base.Editor")
    if not isinstance(getattr(cls, "hparams_class", None), type):
        raise ValueError(f"editor {name!r}: the class must set hparams_class (an EditorHParams dataclass)")
    return cls, {}


def build_editor(
    name: str, hparams: str | Path | dict | EditorHParams | None = None, model_name: str | None = None,
    **overrides: Any,
) -> Editor:
    """An editor with hyperparameters from ``hparams`` (an object, a dict, a YAML path or a preset name), else from
    the preset named after ``model_name`` (``configs/editors/<name>/<model>.yaml``); ``overrides`` replace fields."""
    cls, fixed = editor_class(name)
    hp = resolve_hparams(cls.hparams_class, name, hparams, model_name)
    data = {**hp.to_dict(), **fixed, **overrides}
    return cls(cls.hparams_class.from_dict(data, source=f"{name} hyperparameters"))
