"""Where ApplyEdits' edit comes from, and how it gets into the base model's weights.

- :class:`EditHere`: the editor edits the selected facts (its edited weights cached on disk by content, so runs
  that differ only after editing reuse one edit);
- :class:`PrecomputedEdit`: an output folder of ``retention edit``: its facts are the edit set, its edited
  weights are loaded over the base model, which must be the one it edited;
- :class:`EditedModel`: a model folder with the edits already in it: its weights that differ from the base
  model's are loaded over it; ``knowledge`` names the facts edited into it.

Each applies its edit to the plain base model (before adapters and the strategy's wrap) and returns an
:class:`AppliedEdit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from retention.arch import ArchAdapter, unwrap_model
from retention.data.edit_folder import read_edit_folder
from retention.data.readers import ReadReport, read_records
from retention.diskcache import DiskCache, digest
from retention.editing.base import (
    EditError,
    Editor,
    EditorHParams,
    EditRequest,
    EditResult,
    RequestDiagnostics,
    run_edits,
)
from retention.editing.registry import build_editor, editor_class, editor_hparams
from retention.paths import cache_dir
from retention.records import KnowledgeRecord

Mode = Literal["batch", "sequential", "single"]
EDIT_CACHE_VERSION = 1
"""Bump when editing changes what it computes, so cached entries are recomputed."""


@dataclass
class EditingArgs:
    """How the run edits its edit set."""

    editor: str = "rome"
    """Editor name (rome, memit, alphaedit, ft-l, ft-m) or the import path of an Editor subclass of your own
    (``package.module.Class``)."""
    hparams: str | dict[str, Any] | None = None
    """The editor's hyperparameters: a YAML file, a preset name, or a mapping of fields that override the preset
    named after the model (``{layer: 4}`` keeps the preset's other fields); None for that preset
    (``retention/resources/editors/<editor>/<model>.yaml``; an editor of your own without one gets its
    hyperparameter class's defaults)."""
    mode: Mode = "batch"
    """``batch`` (one editor call) or ``sequential`` (calls of ``batch_size`` requests, each applied before the
    next); ``single`` edits only fact ``single_index`` (one run of the single protocol)."""
    batch_size: int = 1
    """Requests per editor call in ``sequential`` mode."""
    single_index: int | None = None
    """With ``mode: single``, which of the ``n_edit`` selected facts this run edits."""

    def __post_init__(self) -> None:
        try:
            editor_class(self.editor)
        except ValueError as err:
            raise ValueError(f"ApplyEdits: {err}") from None
        if self.batch_size < 1:
            raise ValueError(f"ApplyEdits: batch_size={self.batch_size} must be >= 1")
        if self.mode not in ("batch", "sequential", "single"):
            raise ValueError(f"ApplyEdits: mode {self.mode!r} unknown; choose batch, sequential or single")
        if (self.mode == "single") != (self.single_index is not None):
            raise ValueError("ApplyEdits: mode 'single' needs single_index (and single_index needs mode 'single')")


@dataclass
class EarlierEditArgs:
    """An edit made earlier, used instead of editing (an edit of a large model is then made once, not on every
    rank: every rank loads the same files)."""

    precomputed: str | None = None
    """An output folder of ``retention edit`` (batch or sequential mode) whose edit the run uses instead of
    editing: its facts are the edit set, its edited weights are loaded over the base model (which must be the
    model it edited). ``editor`` must name its editor; ``hparams`` stays unset."""
    edited_model: str | None = None
    """A model folder (safetensors) holding the base model with edits already in it: its weights are loaded over
    the base model after the control facts are selected, the weights that differ are the edited ones;
    ``knowledge`` names the facts edited into it (all of them are the edit set, measured as given, never
    filtered by ``known_protocol``)."""
    controls: str | None = None
    """With ``edited_model``, the source of the control facts (a file or ``builtin``), needed when ``n_control``
    > 0. Otherwise controls come from ``knowledge``."""

    def __post_init__(self) -> None:
        if self.precomputed is not None and self.edited_model is not None:
            raise ValueError("ApplyEdits: precomputed and edited_model both give an edit made earlier; set one")
        if self.controls is not None and self.edited_model is None:
            raise ValueError("ApplyEdits: controls is only for edited_model (knowledge then holds the edited facts); "
                             "a run that edits, or uses precomputed, draws its controls from knowledge")

    @property
    def earlier(self) -> str | None:
        """The option that gives an edit made earlier (``precomputed``, ``edited_model``), or None."""
        return "precomputed" if self.precomputed is not None else \
            "edited_model" if self.edited_model is not None else None


@dataclass
class AppliedEdit:
    """What an edit changed in the model."""

    layers: list[int] = field(default_factory=list)
    """Decoder layers of the changed weights."""
    parameters: list[str] = field(default_factory=list)
    """Names (in the base model) of the changed weights."""
    diagnostics: list[dict] = field(default_factory=list)
    """Per edit request: seconds, update norm, relative update (‖ΔW‖/‖W‖ of its call) and the editor's own
    numbers (e.g. target probability)."""
    hparams: dict[str, Any] | None = None
    """The editor's hyperparameters as the edit used them (preset, file or mapping resolved); None when the
    edit was not made here."""
    cache_hit: bool | None = None
    """Whether the edited weights came from the edit cache (None: no edit cache involved)."""
    seconds: float = 0.0


def diagnostics_row(d: RequestDiagnostics) -> dict:
    """One request's diagnostics as the run summary lists them."""
    return {"case_id": d.case_id, "seconds": d.seconds, "delta_norm": d.delta_norm,
            "relative_update": d.relative_update, **d.values}


def _made(results: list[EditResult], hparams: dict) -> AppliedEdit:
    """What the edit ``results`` (applied to the model) changed."""
    return AppliedEdit(sorted({i for r in results for i in r.layers}), sorted({n for r in results for n in r.deltas}),
                       [diagnostics_row(d) for r in results for d in r.diagnostics], hparams, False)


def _reused(base: torch.nn.Module, hit: tuple[dict, dict[str, torch.Tensor]], hparams: dict) -> AppliedEdit:
    """The edit cache's entry ``hit`` copied into ``base``."""
    payload, weights = hit
    copy_weights(base, weights)
    return AppliedEdit(payload["layers"], sorted(weights), payload["diagnostics"], hparams, True)


def _payload(applied: AppliedEdit) -> dict:
    return {"layers": applied.layers, "diagnostics": applied.diagnostics}


def _edited_weights(base: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The edited weights themselves, not the deltas, for the edit cache: W0 + (d1 + d2) is not (W0 + d1) + d2 in
    floats, and a reused edit must give the model the editor left, bit for bit."""
    return {n: base.get_parameter(n).detach().clone() for n in names}


def copy_weights(base: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (by parameter name) into ``base``'s parameters, in place."""
    with torch.no_grad():
        for name, value in weights.items():
            base.get_parameter(name).copy_(value)


class EditSource(ABC):
    """Where the edit comes from."""

    edit_set: list[KnowledgeRecord] | None = None
    """The facts of an edit made earlier, in edit order; None when the run selects and edits its own."""
    edit_set_report: ReadReport | None = None
    """How reading ``edit_set`` went, when it was read from a knowledge file."""

    @abstractmethod
    def apply(self, pl_module, records: list[KnowledgeRecord], fingerprint: str,
              singles: list[KnowledgeRecord] | None = None) -> AppliedEdit:
        """Put the edit of ``records`` into ``pl_module.model`` (the unwrapped base model, with weight fingerprint
        ``fingerprint``). ``singles``: in a single-protocol run, its seed's edit set, ``records`` one fact of it
        (only an edit made here uses them: the single protocol refuses an edit made earlier)."""

    @abstractmethod
    def made_with(self, applied: AppliedEdit | None) -> tuple[str | None, Any, str | None]:
        """The editor, hyperparameters and mode the edit was made with, as the run summary reports them."""

    @abstractmethod
    def layers(self, model_name: str) -> list[int] | None:
        """The layers the edit changes, known before any weights load (None: not known yet)."""


class EditHere(EditSource):
    """The editor edits the selected facts, or the edit cache gives the weights an identical edit left."""

    def __init__(self, args: EditingArgs, cache: bool):
        self.args, self.cache = args, cache
        self._hparams: dict[str | None, EditorHParams] = {}
        """Resolved hyperparameters by model name: the option check before the run and the edit read them once."""

    def hparams(self, model_name: str | None) -> EditorHParams:
        """The editor's hyperparameters for ``model_name``, resolved once (errors name the bad field)."""
        if model_name not in self._hparams:
            self._hparams[model_name] = editor_hparams(self.args.editor, self.args.hparams, model_name)
        return self._hparams[model_name]

    def apply(self, pl_module, records: list[KnowledgeRecord], fingerprint: str,
              singles: list[KnowledgeRecord] | None = None) -> AppliedEdit:
        """Edit ``records``, or copy in the weights an identical edit left in the edit cache. With ``singles``
        (a single-protocol run, ``records`` one fact of them) and the cache, the seed's first run edits every fact
        of ``singles`` (:func:`~retention.editing.base.run_edits` in single mode: each alone on the base model,
        their targets optimised together) and caches each one's edited weights under its key plus
        ``batched_over``, the batch's digest, which an edit made alone never has; the seed's other runs read
        theirs. A refused batch (an :class:`~retention.editing.base.EditError` of any fact) is recorded, and each
        run then edits its own fact alone."""
        t0 = time.perf_counter()
        args = self.args
        model_name = getattr(pl_module, "model_name", None)
        editor = build_editor(args.editor, self.hparams(model_name), model_name)
        hparams = editor.hparams.to_dict()
        requests = [EditRequest.from_record(r) for r in records]
        # A single-protocol run edits its one fact alone: a batch call of one request.
        mode = "batch" if args.mode == "single" else args.mode
        store = DiskCache(cache_dir() / "edits")
        key = {"version": EDIT_CACHE_VERSION, "model": fingerprint, "editor": args.editor,
               "hparams": hparams, "mode": mode, "batch_size": args.batch_size,
               "requests": [dataclasses.asdict(r) for r in requests]}
        cached = self.cache and not editor.edits_in_memory
        base = unwrap_model(pl_module.model)
        applied = None
        if singles is not None and cached:
            batch = [EditRequest.from_record(r) for r in singles]
            applied = self._from_batch(editor, pl_module, fingerprint, store, key, batch, requests[0])
        if applied is None:
            # Runs started together (study --jobs) make an edit once: the others wait, then read it.
            with store.lock(key) if cached else contextlib.nullcontext():
                hit = store.get(key) if cached else None
                if hit is not None:
                    applied = _reused(base, hit, hparams)
                else:
                    editor.prepare(pl_module.model, pl_module.tokenizer, fingerprint)
                    results = run_edits(editor, pl_module.model, pl_module.tokenizer, requests, mode, args.batch_size)
                    applied = _made(results, hparams)
                    if cached:
                        store.put(key, _payload(applied), _edited_weights(base, applied.parameters))
        applied.seconds = time.perf_counter() - t0
        where = next(pl_module.model.parameters())
        how = "reused from the edit cache" if applied.cache_hit else "edited"
        rank_zero_info(f"{args.editor} ({args.mode}): {len(requests)} edits in layers {applied.layers} {how} "
                       f"({applied.seconds:.1f} s on {where.device}, {where.dtype})")
        return applied

    @staticmethod
    def _from_batch(editor: Editor, pl_module, fingerprint: str, store: DiskCache, key: dict,
                    batch: list[EditRequest], request: EditRequest) -> AppliedEdit | None:
        """The edit of ``request`` (one of ``batch``, the seed's facts) from the seed's batch of single edits,
        made now when no run made it yet; None when the batch was refused."""
        over = digest([dataclasses.asdict(r) for r in batch])

        def key_of(r: EditRequest) -> dict:
            return {**key, "requests": [dataclasses.asdict(r)], "batched_over": over}

        # The batch's lock, and its record once tried: the seed's runs try a refused batch once.
        attempt = {k: v for k, v in key.items() if k != "requests"} | {"batched_over": over}
        base = unwrap_model(pl_module.model)
        with store.lock(attempt):
            hit = store.get(key_of(request))
            if hit is not None:
                return _reused(base, hit, key["hparams"])
            if store.get(attempt) is not None:
                return None
            editor.prepare(pl_module.model, pl_module.tokenizer, fingerprint)
            try:
                results = run_edits(editor, pl_module.model, pl_module.tokenizer, batch, "single")
            except EditError as err:
                store.put(attempt, {"refused": str(err)})
                rank_zero_warn(f"{editor.name}: the single edits of the seed's {len(batch)} facts, made together, "
                               f"were refused ({err}); each run edits its own fact alone")
                return None
            own, own_weights = None, {}
            for r, result in zip(batch, results):
                result.apply(base)
                made = _made([result], key["hparams"])
                weights = _edited_weights(base, made.parameters)
                result.revert(base)
                store.put(key_of(r), _payload(made), weights)
                if r == request:
                    own, own_weights = made, weights
            store.put(attempt, {"facts": len(batch)})
        copy_weights(base, own_weights)
        return own

    def made_with(self, applied: AppliedEdit | None) -> tuple[str | None, Any, str | None]:
        hparams = self.args.hparams if applied is None else applied.hparams
        return self.args.editor, hparams, self.args.mode

    def layers(self, model_name: str) -> list[int] | None:
        """The layers the hyperparameters name (resolved without the model: errors name the bad field; None
        for ``located``)."""
        hparams = self.hparams(model_name).to_dict()
        layers = hparams.get("layers", hparams.get("layer"))
        return [layers] if isinstance(layers, int) else layers if isinstance(layers, list) else None


class PrecomputedEdit(EditSource):
    """The edit an output folder of ``retention edit`` holds (``precomputed``); ``contents`` is the folder as
    :func:`~retention.data.edit_folder.read_edit_folder` reads it."""

    def __init__(self, folder: str, args: EditingArgs):
        try:
            self.contents = read_edit_folder(folder)
        except (OSError, ValueError) as err:
            raise ValueError(f"ApplyEdits: precomputed {folder!r}: {err}") from None
        if args.editor != self.contents["editor"]:
            raise ValueError(f"ApplyEdits: precomputed {folder!r} is a {self.contents['editor']} edit, but editor is "
                             f"{args.editor!r}: set editor: {self.contents['editor']}")
        if args.mode not in ("batch", self.contents["mode"]):
            raise ValueError(f"ApplyEdits: precomputed {folder!r} was edited in {self.contents['mode']} mode, but mode "
                             f"is {args.mode!r}: leave mode out")
        self.folder = folder
        self.edit_set = self.contents["records"]

    def apply(self, pl_module, records: list[KnowledgeRecord], fingerprint: str,
              singles: list[KnowledgeRecord] | None = None) -> AppliedEdit:
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        base = unwrap_model(pl_module.model)
        if fingerprint != self.contents["base_fingerprint"]:
            raise ValueError(f"edits.precomputed {self.folder}: edited another base model (weight fingerprint "
                             f"{self.contents['base_fingerprint']}, this model's {fingerprint}); give the model "
                             "`retention edit` edited as model.model_name, in float32")
        weights = load_file(str(self.contents["weights"]))
        copy_weights(base, weights)
        applied = AppliedEdit(list(self.contents["layers"]), sorted(weights),
                              [diagnostics_row(RequestDiagnostics(**d)) for d in self.contents["diagnostics"]])
        return _loaded(applied, records, self.folder, t0)

    def made_with(self, applied: AppliedEdit | None) -> tuple[str | None, Any, str | None]:
        return self.contents["editor"], self.contents["hparams"], self.contents["mode"]

    def layers(self, model_name: str) -> list[int] | None:
        return list(self.contents["layers"])


class EditedModel(EditSource):
    """The edits in a model folder (``edited_model``), the facts edited into it read from ``knowledge``."""

    def __init__(self, folder: str, knowledge: str, on_error: str):
        if not any(Path(folder).glob("*.safetensors")):
            raise ValueError(f"ApplyEdits: edited_model {folder!r} is not a model folder with safetensors weights")
        self.folder = folder
        self.edit_set, self.edit_set_report = read_records(knowledge, on_error=on_error)

    def apply(self, pl_module, records: list[KnowledgeRecord], fingerprint: str,
              singles: list[KnowledgeRecord] | None = None) -> AppliedEdit:
        """Copy the edited model's weights that differ from the base model's (compared in the edited model's
        dtype, so a bfloat16 copy of an float32 base changes only its edited weights)."""
        from safetensors import safe_open

        t0 = time.perf_counter()
        base = unwrap_model(pl_module.model)
        folder = Path(self.folder)
        state = base.state_dict()
        params = dict(base.named_parameters())
        changed = []
        with torch.no_grad():
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        target = state.get(name)
                        value = f.get_tensor(name)
                        if target is None or target.shape != value.shape:
                            raise ValueError(
                                f"edits.edited_model {folder}: {file.name} holds {name} "
                                f"{tuple(value.shape)}, which the base model has "
                                f"{'not' if target is None else f'as {tuple(target.shape)}'}: not an edit of it")
                        if not torch.equal(target.to(value.dtype).cpu(), value):
                            target.copy_(value)
                            changed.append(name)
        if not any(name in params for name in changed):
            raise ValueError(f"edits.edited_model {folder}: no weight differs from the base model's; model.model_name "
                             "must be the unedited model it was edited from")
        arch = ArchAdapter.for_model(base)
        parameters = sorted(n for n in changed if n in params)
        layers = sorted({i for n in parameters if (i := arch.layer_index_of(n)) is not None})
        return _loaded(AppliedEdit(layers, parameters), records, self.folder, t0)

    def made_with(self, applied: AppliedEdit | None) -> tuple[str | None, Any, str | None]:
        return None, None, None

    def layers(self, model_name: str) -> list[int] | None:
        return None


def _loaded(applied: AppliedEdit, records: list[KnowledgeRecord], folder: str, t0: float) -> AppliedEdit:
    applied.seconds = time.perf_counter() - t0
    rank_zero_info(f"{len(records)} edits in layers {applied.layers} loaded from {folder} ({applied.seconds:.1f} s)")
    return applied
