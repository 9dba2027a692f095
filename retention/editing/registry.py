"""Editors by name, with their hyperparameters from a preset, a YAML file or a dict."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retention.editing.alphaedit import AlphaEditEditor
from retention.editing.base import PRESETS, Editor, EditorHParams, preset_name, resolve_hparams
from retention.editing.ft import FtEditor
from retention.editing.grace import GraceEditor
from retention.editing.memit import MemitEditor
from retention.editing.rome import RomeEditor
from retention.editing.wise import WiseEditor

EDITORS: dict[str, tuple[type[Editor], dict[str, Any]]] = {
    "rome": (RomeEditor, {}),
    "memit": (MemitEditor, {}),
    "alphaedit": (AlphaEditEditor, {}),
    "ft-l": (FtEditor, {"variant": "ft-l"}),
    "ft-m": (FtEditor, {"variant": "ft-m"}),
    "grace": (GraceEditor, {}),
    "wise": (WiseEditor, {}),
}
"""Name -> (editor class, hyperparameters the name fixes: they replace whatever the preset or file says)."""


def _import(module_name: str):
    """``module_name`` imported; a module that is not on ``sys.path`` is looked for in the working directory too
    (the ``retention`` script's path is its own folder, not the one it runs in, unlike ``python -m``)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        cwd = str(Path.cwd())
        if err.name != module_name.split(".")[0] or cwd in sys.path:
            raise
        sys.path.append(cwd)  # for this import only: the process's search path is left as it was
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(cwd)


def editor_class(name: str) -> tuple[type[Editor], dict[str, Any]]:
    """The editor class a name selects, with the hyperparameters the name fixes: one of :data:`EDITORS`, or the
    import path of any :class:`Editor` subclass (``package.module.Class`` or ``package.module:Class``). A module
    outside the installed packages is imported from the working directory."""
    if name in EDITORS:
        return EDITORS[name]
    module_name, sep, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    if not sep or not module_name:
        raise ValueError(f"unknown editor {name!r}; choose from {', '.join(EDITORS)} or give the import path of an "
                         "Editor subclass (package.module.Class)")
    try:
        cls = getattr(_import(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"editor {name!r}: cannot import {attr!r} from {module_name!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Editor)):
        raise ValueError(f"editor {name!r} is not a subclass of retention.editing.base.Editor")
    if not isinstance(getattr(cls, "hparams_class", None), type):
        raise ValueError(f"editor {name!r}: the class must set hparams_class (an EditorHParams dataclass)")
    return cls, {}


def has_preset(name: str, model_name: str | None) -> bool:
    """Whether ``retention/resources/editors/<name>/`` holds the preset named after ``model_name``."""
    return model_name is not None and (PRESETS / name / f"{preset_name(model_name)}.yaml").is_file()


def editor_hparams(
    name: str, hparams: str | Path | Mapping[str, Any] | EditorHParams | None = None, model_name: str | None = None,
    **overrides: Any,
) -> EditorHParams:
    """The resolved hyperparameters of editor ``name`` (see :func:`build_editor`), checked field by field."""
    cls, fixed = editor_class(name)
    hp_class = cls.hparams_class
    if isinstance(hparams, Mapping):
        # A mapping overrides fields of the model's preset (as ``retention edit --set`` does), not the whole of it.
        base = resolve_hparams(hp_class, name, None, model_name).to_dict() if has_preset(name, model_name) else {}
        hp = hp_class.from_dict({**base, **hparams}, source=f"{name} hyperparameters")
    elif hparams is None and name not in EDITORS and not has_preset(name, model_name):
        try:
            hp = hp_class()  # an editor of your own without a preset: its dataclass defaults
        except TypeError as err:
            raise ValueError(f"editor {name!r}: {hp_class.__name__} has fields without defaults ({err}); give "
                             "hparams (a YAML file or a mapping)") from None
    else:
        hp = resolve_hparams(hp_class, name, hparams, model_name)
    data = {**hp.to_dict(), **fixed, **overrides}
    return hp_class.from_dict(data, source=f"{name} hyperparameters")


def build_editor(
    name: str, hparams: str | Path | Mapping[str, Any] | EditorHParams | None = None, model_name: str | None = None,
    **overrides: Any,
) -> Editor:
    """Editor ``name`` (one of :data:`EDITORS` or the import path of an :class:`Editor` subclass) with
    hyperparameters from, in order of precedence:

    - ``overrides`` (keyword fields), over
    - ``hparams``: an :class:`EditorHParams` object, a YAML path, a preset name (``retention/resources/editors/<name>/``) or a
      mapping; a mapping overrides only the fields it names of the preset named after ``model_name`` (the class
      defaults when there is none);
    - with ``hparams`` None: the preset named after ``model_name`` (``retention/resources/editors/<name>/<model>.yaml``);
      an editor of your own without such a preset gets its hyperparameter class's defaults.
    """
    cls, _ = editor_class(name)
    return cls(editor_hparams(name, hparams, model_name, **overrides))
