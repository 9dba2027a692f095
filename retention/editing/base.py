"""What every editor shares: edit requests, edit results (exact apply/revert, save/load), typed hyperparameters
loadable from YAML presets, the :class:`Editor` interface and the edit modes.

An editor computes weight deltas and leaves the model's weights as it found them; :meth:`EditResult.apply`
writes them and :meth:`EditResult.revert` restores the saved original weights bit for bit.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from retention.arch import unwrap_model
from retention.corpus import anchor
from retention.io import atomic_path, atomic_write_json, nan_for_null
from retention.records import KnowledgeRecord

log = logging.getLogger(__name__)

PRESETS = importlib.resources.files("retention") / "resources" / "editors"
"""Per-model hyperparameter presets, shipped as package data: ``retention/resources/editors/<editor>/<preset>.yaml``
(a :class:`~importlib.resources.abc.Traversable`; a plain folder unless the package is imported from a zip)."""
MODES = ("batch", "sequential", "single")
LARGE_UPDATE_ACTIONS = ("error", "warn")


class EditError(RuntimeError):
    """An edit that cannot be made or produced an unusable update; names the request."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should continue with ``target_new``."""

    case_id: str
    subject: str
    prompt: str
    """Template with one ``{}`` for the subject."""
    target_new: str
    target_true: str = ""
    augmentations: tuple[str, ...] = ()
    """Extra phrasings (templates with ``{}``) used while editing only, never for evaluation."""

    def __post_init__(self):
        for name, template in [("prompt", self.prompt), *(("augmentations", a) for a in self.augmentations)]:
            if template.count("{}") != 1:
                raise ValueError(f"edit request {self.case_id}: {name} {template!r} must contain exactly one '{{}}'")
        for name in ("subject", "target_new"):
            if not getattr(self, name).strip():
                raise ValueError(f"edit request {self.case_id}: {name} is empty")

    @classmethod
    def from_record(cls, record: KnowledgeRecord) -> EditRequest:
        return cls(str(record.case_id), record.subject, record.prompt, record.target_new, record.target_true,
                   tuple(record.augmentations))

    @property
    def templates(self) -> tuple[str, ...]:
        """The rewriting phrasings: the prompt, then the augmentations."""
        return (self.prompt, *self.augmentations)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def describe(self) -> str:
        return f"edit request {self.case_id} ({self.rewrite_prompt!r} -> {self.target_new!r})"


def describe_requests(requests: EditRequest | Sequence[EditRequest], limit: int = 3) -> str:
    """The first ``limit`` requests described, and how many more there are."""
    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    text = "; ".join(r.describe() for r in reqs[:limit])
    return text + (f" and {len(reqs) - limit} more" if len(reqs) > limit else "")


def check_finite(tensor: torch.Tensor, request: EditRequest | Sequence[EditRequest], what: str) -> torch.Tensor:
    """``tensor`` itself, or an :class:`EditError` naming the request(s) when it has NaN/inf entries."""
    if not torch.isfinite(tensor).all():
        raise EditError(f"{describe_requests(request)}: non-finite {what}; the edit is not applied "
                        "(try a smaller learning rate, a smaller clamp or mom2_adjustment: false)")
    return tensor


@dataclass
class RequestDiagnostics:
    """How one request's edit went."""

    case_id: str
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    """The optimisation loss per step (v* for ROME, the fine-tuning loss for FT)."""
    delta_norm: float = math.nan
    """Frobenius norm of the weight update this request made."""
    values: dict[str, float] = field(default_factory=dict)
    """Editor-specific numbers (e.g. ``target_prob``, ``delta_v_norm``, ``steps``)."""
    relative_update: float = math.nan
    """The largest ``‖ΔW‖/‖W‖`` over the weights the editor call that made this request changed (set by
    :func:`run_edits`)."""


@dataclass
class EditResult:
    """Weight deltas of one editor call, in each parameter's stored layout, with what it cost and how it went."""

    editor: str
    deltas: dict[str, torch.Tensor]
    """Parameter name (relative to the unwrapped model) -> float32 delta of the stored weight's shape."""
    layers: list[int]
    case_ids: list[str]
    diagnostics: list[RequestDiagnostics] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    @property
    def applied(self) -> bool:
        return bool(self._originals)

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        base = unwrap_model(model)
        params = {}
        for name, delta in self.deltas.items():
            try:
                p = base.get_parameter(name)
            except AttributeError:
                raise EditError(f"{self.editor} result: the model has no parameter {name!r}") from None
            if p.shape != delta.shape:
                raise EditError(f"{self.editor} result: delta for {name} has shape {tuple(delta.shape)}, "
                                f"the parameter {tuple(p.shape)}")
            params[name] = p
        return params

    @torch.no_grad()
    def relative_norms(self, model: nn.Module) -> dict[str, float]:
        """``‖ΔW‖/‖W‖`` (Frobenius) of each delta against the model's weight as it is now."""
        out = {}
        for name, p in self._params(model).items():
            delta = torch.linalg.vector_norm(self.deltas[name], dtype=torch.float64).item()
            weight = torch.linalg.vector_norm(p.detach(), dtype=torch.float64).item()
            out[name] = delta / weight if weight > 0 else math.inf if delta > 0 else 0.0
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Add the deltas to the model's weights (computed in float32, stored in the weight's dtype)."""
        if self.applied:
            raise EditError(f"{self.editor} result for {len(self.case_ids)} request(s) is already applied")
        for name, p in self._params(model).items():
            self._originals[name] = p.detach().clone()
            p.copy_((p.float() + self.deltas[name].to(p.device)).to(p.dtype))

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Restore the weights saved by :meth:`apply`, bit for bit."""
        if not self.applied:
            raise EditError(f"{self.editor} result for {len(self.case_ids)} request(s) is not applied; nothing to revert")
        for name, p in self._params(model).items():
            p.copy_(self._originals[name])
        self._originals = {}

    @classmethod
    def merge(cls, results: Sequence[EditResult]) -> EditResult:
        """One result whose deltas are the sums of ``results``' deltas (e.g. a sequential run, for saving). When
        every result is applied (in order), so is the merged one: its :meth:`revert` restores the weights as they
        were before the first."""
        if not results:
            raise ValueError("no edit results to merge")
        deltas: dict[str, torch.Tensor] = {}
        for r in results:
            for name, d in r.deltas.items():
                deltas[name] = deltas[name] + d if name in deltas else d.clone()
        merged = cls(
            results[0].editor, deltas, sorted({i for r in results for i in r.layers}),
            [c for r in results for c in r.case_ids], [d for r in results for d in r.diagnostics],
            results[0].hparams, sum(r.seconds for r in results),
        )
        if all(r.applied for r in results):
            for r in results:
                for name, original in r._originals.items():
                    merged._originals.setdefault(name, original)
        return merged

    def __repr__(self) -> str:
        shapes = {name: tuple(d.shape) for name, d in self.deltas.items()}
        shown = dict(list(shapes.items())[:4])
        more = f" and {len(shapes) - len(shown)} more" if len(shapes) > len(shown) else ""
        return (f"EditResult(editor={self.editor!r}, requests={len(self.case_ids)}, layers={self.layers}, "
                f"deltas={shown}{more}, seconds={self.seconds:.3g}, applied={self.applied})")

    def save(self, folder: str | Path) -> Path:
        """Write ``deltas.safetensors`` and ``edit.json`` (everything else) into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_path(folder / "deltas.safetensors") as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.deltas.items()}, str(tmp))
        meta = {
            "editor": self.editor, "layers": self.layers, "case_ids": self.case_ids, "hparams": self.hparams,
            "seconds": self.seconds, "diagnostics": [asdict(d) for d in self.diagnostics],
        }
        atomic_write_json(folder / "edit.json", meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EditResult:
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in ("edit.json", "deltas.safetensors"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a saved edit result: {name} is missing")
        meta = json.loads((folder / "edit.json").read_text(encoding="utf-8"))
        deltas = load_file(str(folder / "deltas.safetensors"))
        diagnostics = [RequestDiagnostics(**nan_for_null(d, ("delta_norm", "relative_update")))
                       for d in meta.pop("diagnostics")]
        return cls(deltas=deltas, diagnostics=diagnostics, **meta)


H = TypeVar("H", bound="EditorHParams")

_DEFER_RESOLVE: ContextVar[bool] = ContextVar("retention_defer_resolve", default=False)


@contextmanager
def unresolved() -> Iterator[None]:
    """Hyperparameters made inside skip :meth:`EditorHParams.resolve` (their values are still validated): a
    preset read only to be overridden must not fail, or warn, for a corpus the override replaces."""
    token = _DEFER_RESOLVE.set(True)
    try:
        yield
    finally:
        _DEFER_RESOLVE.reset(token)


def _coerce(name: str, hint: Any, value: Any, source: str) -> Any:
    """``value`` as the field's type (YAML reads ``5e-4`` as a string); an error names the field and the file."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members[:-1]:  # e.g. ``list[int] | str``: the first type the value fits
            try:
                return _coerce(name, member, value, source)
            except ValueError:
                pass
        hint = members[-1]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is float and not isinstance(value, bool):
            return float(value)
        if hint is int and not isinstance(value, (bool, float)):
            return int(value)
        if hint is bool and isinstance(value, bool):
            return value
        if hint is str and isinstance(value, str):
            return value
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            items = [_coerce(name, args[0], v, source) for v in value] if args else list(value)
            return items if origin is list else tuple(items)
        if hint is typing.Any:
            return value
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{source}: {name}={value!r} is not a valid {getattr(hint, '__name__', hint)}")


@dataclass
class EditorHParams:
    """Base of the editors' hyperparameter dataclasses: the update guard every editor shares (the other fields
    are documented in each subclass)."""

    max_relative_update: float = 10.0
    """Largest ``‖ΔW‖/‖W‖`` (Frobenius) one editor call may give a weight, checked by :func:`run_edits` before the
    update is applied. Normal edits stay far below 1 (SmolLM2-135M presets: ROME about 0.25 per edit, AlphaEdit
    below 0.2 for 20 edits), so a larger update is a diverged optimisation, not an edit."""
    on_large_update: str = "error"
    """A larger update: ``error`` (an :class:`EditError` naming the weight and the requests, nothing applied) or
    ``warn`` (logged, then applied)."""

    path_fields: ClassVar[tuple[str, ...]] = ()
    """Fields holding a file path (e.g. ``mom2_corpus``): in a YAML file, a relative path is relative to the file."""

    def __post_init__(self):
        self.validate()
        if not _DEFER_RESOLVE.get():
            self.resolve()

    def validate(self) -> None:
        """Raise ValueError naming the field of a value out of range."""
        if not self.max_relative_update > 0:
            raise ValueError(f"max_relative_update={self.max_relative_update}: must be > 0")
        if self.on_large_update not in LARGE_UPDATE_ACTIONS:
            raise ValueError(f"on_large_update={self.on_large_update!r}: choose from {', '.join(LARGE_UPDATE_ACTIONS)}")

    def resolve(self) -> None:
        """Settle what depends on this machine (e.g. which key-statistics corpus is readable), so that a run stops
        before any model is loaded; an error names the field. Runs after :meth:`validate` (nothing here)."""

    @classmethod
    def from_dict(cls: type[H], data: dict[str, Any], source: str = "hyperparameters") -> H:
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.__name__} field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**{k: _coerce(k, hints[k], v, source) for k, v in data.items()})

    @classmethod
    def read_yaml(cls, path: str | Path, what: str = "hyperparameter file") -> dict[str, Any]:
        """The mapping a YAML file holds (``what`` names the file in errors)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of hyperparameters, got {type(data).__name__}")
        return data

    @classmethod
    def anchor_paths(cls, data: dict[str, Any], path: str | Path) -> dict[str, Any]:
        """``data`` with its :attr:`path_fields` taken relative to the folder of the file ``path`` they came from."""
        base = Path(path).resolve().parent
        for name in cls.path_fields:
            value = data.get(name)
            if isinstance(value, str):
                data[name] = anchor(value, base)
            elif isinstance(value, list):  # an ordered fallback list (mom2_corpus)
                data[name] = [anchor(v, base) if isinstance(v, str) else v for v in value]
        return data

    @classmethod
    def from_yaml(cls: type[H], path: str | Path) -> H:
        return cls.from_dict(cls.anchor_paths(cls.read_yaml(path), path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_name(model_name: str) -> str:
    """The preset a model name selects: its last path component, lower-cased (``gpt2-xl``, ``smollm2-135m``)."""
    return Path(str(model_name).rstrip("/")).name.lower().removesuffix(".gguf")


def preset_names(editor: str) -> list[str]:
    """The presets shipped for ``editor`` (file names without ``.yaml``), sorted; empty for an unknown editor."""
    folder = PRESETS / editor
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_hparams(cls: type[H], editor: str, hparams: str | Path | dict | H | None, model_name: str | None) -> H:
    """Hyperparameters from an object, a dict, a YAML path, a preset name, or the preset of ``model_name``, not
    yet resolved (:func:`unresolved`): the caller overrides fields, then builds the final object."""
    with unresolved():
        return _read_hparams(cls, editor, hparams, model_name)


def _read_hparams(cls: type[H], editor: str, hparams: str | Path | dict | H | None, model_name: str | None) -> H:
    if isinstance(hparams, str) and hparams.startswith("easyedit:"):  # an EasyEdit hparams file, mapped to ours
        from retention.editing.easyedit import load_easyedit

        return load_easyedit(cls, editor, hparams.removeprefix("easyedit:"))
    if isinstance(hparams, cls):
        return hparams
    if isinstance(hparams, dict):
        return cls.from_dict(hparams)
    folder = PRESETS / editor
    available = preset_names(editor)
    if hparams is not None:
        path = Path(hparams)
        if path.suffix in (".yaml", ".yml") or path.exists():
            return cls.from_yaml(path)
        name = str(hparams)
    elif model_name is not None:
        name = preset_name(model_name)
    else:
        raise ValueError(f"{editor}: give hyperparameters (a YAML file or a preset: {', '.join(available)})")
    if name not in available:
        raise FileNotFoundError(f"{editor}: no preset '{name}' in {folder} (available: {', '.join(available) or 'none'}); "
                                "pass a hyperparameter YAML file instead")
    with importlib.resources.as_file(folder / f"{name}.yaml") as path:
        return cls.from_yaml(path)


class Editor(ABC):
    """Computes weight deltas for edit requests; leaves the model's weights as it found them.

    Editors are built by name (or the import path of a subclass of your own) with hyperparameters resolved over
    the model's preset; ``editor.edit(model, tokenizer, requests)`` then gives an :class:`EditResult`:

    >>> from retention.editing.registry import build_editor
    >>> editor = build_editor("rome", {"layer": 4}, "smollm2-135m")
    >>> editor.name, editor.hparams.layer, type(editor.hparams).__name__
    ('rome', 4, 'RomeHParams')
    """

    name: ClassVar[str]
    hparams_class: ClassVar[type[EditorHParams]]
    edits_in_memory: ClassVar[bool] = False
    """True for editors whose results attach a memory module instead of changing weights (GRACE, WISE): the edit
    cache, which stores edited weights, cannot hold them."""

    def __init__(self, hparams: EditorHParams):
        if not isinstance(hparams, self.hparams_class):
            raise TypeError(f"{type(self).__name__} needs {self.hparams_class.__name__}, got {type(hparams).__name__}")
        self.hparams = hparams

    def prepare(self, model: nn.Module, tokenizer, fingerprint: str | None = None) -> Any:
        """Set up for ``model`` before its first edit (nothing by default); ``fingerprint``: the caller's
        :func:`~retention.models.model_fingerprint` of its weights, so they are not hashed twice."""
        return None

    @abstractmethod
    def edit(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> EditResult:
        """The deltas that write all ``requests`` into ``model`` (together, as one update)."""

    def edit_singles(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[EditResult]:
        """Each request edited alone on ``model`` as it is: one result per request, in order, each the update
        :meth:`edit` of that request alone gives; the model is left as it was. By default one :meth:`edit` per
        request; ROME, MEMIT and AlphaEdit optimise the requests' targets together."""
        return [self.edit(model, tokenizer, [r]) for r in requests]


def check_update(result: EditResult, model: nn.Module, requests: Sequence[EditRequest],
                 hparams: EditorHParams) -> dict[str, float]:
    """The relative norms ``‖ΔW‖/‖W‖`` of ``result``'s deltas (see :meth:`EditResult.relative_norms`); an
    :class:`EditError` naming the requests when a delta is non-finite, or when one is above
    ``hparams.max_relative_update`` and ``hparams.on_large_update`` is ``error`` (``warn`` logs it)."""
    for name, delta in result.deltas.items():
        check_finite(delta, requests, f"{result.editor} update of {name}")
    relative = result.relative_norms(model)
    large = {n: r for n, r in relative.items() if r > hparams.max_relative_update}
    if large:
        name, value = max(large.items(), key=lambda item: item[1])
        message = (f"{describe_requests(requests)}: the {result.editor} update of {name} has ‖ΔW‖/‖W‖ = {value:.3g}, "
                   f"above max_relative_update={hparams.max_relative_update:g} ({len(large)} weight(s) above; "
                   "normal edits stay far below 1)")
        advice = ("lower the editor's learning rate (v_lr, lr) or clamp_norm_factor, or raise max_relative_update "
                  "(on_large_update: warn applies it anyway)")
        if hparams.on_large_update == "error":
            raise EditError(f"{message}; the edit is not applied: {advice}")
        log.warning("%s; applied anyway (on_large_update: warn)", message)
    return relative


def run_edits(
    editor: Editor, model: nn.Module, tokenizer, requests: Sequence[EditRequest], mode: str = "sequential",
    batch_size: int = 1,
) -> list[EditResult]:
    """Edit ``requests`` in one of :data:`MODES`.

    - ``batch``: one editor call for all requests; the model is left edited; one result.
    - ``sequential``: calls of ``batch_size`` requests, each applied before the next is computed; the model is
      left edited; one result per call.
    - ``single``: each request alone on the unedited model (:meth:`Editor.edit_singles`); the model is left
      unedited; one result per request (apply one at a time).

    Every result passes :func:`check_update` before it is applied; its relative norm goes into the diagnostics.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose from {', '.join(MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if not requests:
        return []
    t0 = time.perf_counter()

    def checked(result: EditResult, group: list[EditRequest]) -> float:
        relative = max(check_update(result, model, group, editor.hparams).values(), default=0.0)
        for diag in result.diagnostics:
            diag.relative_update = relative
        return relative

    if mode == "single":
        results = editor.edit_singles(model, tokenizer, requests)
        for request, result in zip(requests, results):
            relative = checked(result, [request])
            log.info("%s single: %s in %.1f s, |dW|/|W| %.3g", editor.name, request.case_id, result.seconds, relative)
    else:
        size = len(requests) if mode == "batch" else batch_size
        groups = [list(requests[i : i + size]) for i in range(0, len(requests), size)]
        results = []
        for i, group in enumerate(groups, 1):
            result = editor.edit(model, tokenizer, group)
            relative = checked(result, group)
            result.apply(model)
            results.append(result)
            log.info("%s %s: %d/%d (%d request(s)) in %.1f s, |dW|/|W| %.3g", editor.name, mode, i, len(groups),
                     len(group), result.seconds, relative)
    log.info("%s: %d request(s) edited (%s) in %.1f s", editor.name, len(requests), mode, time.perf_counter() - t0)
    return results
