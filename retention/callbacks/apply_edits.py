"""ApplyEdits: select known facts, split them into edit and control sets, edit, hand over to measurement.

Runs in ``on_base_model_ready``, which the FineTuneModule calls from ``configure_model``: after the base model is
loaded and before adapters, freezing and the strategy's wrap/shard, so the edits land in plain weights. Steps:

1. read the knowledge source and keep the facts the base model knows (``known_protocol``; ``none`` keeps all,
   for tests on random tiny models);
2. split them (seeded, disjoint by subject and object) into ``n_edit`` facts to edit and ``n_control`` facts
   left untouched; give their subjects and objects to the datamodule's ``exclude_terms`` (it drops the examples
   that mention them when it builds its loaders);
3. call ``on_before_edits(trainer, pl_module, records)`` on the pipeline callbacks (paraphrase augmentation
   returns the records with their editing phrasings; without it edits use no augmentation);
4. edit in ``batch`` or ``sequential`` mode, and write the sets, the edited layers and what was edited to the
   module's :class:`~retention.callbacks.pipeline.PipelineState`;
5. call ``on_edits_applied(trainer, pl_module, sets)`` on the pipeline callbacks (the RetentionMonitor measures
   t=0 there).

Under DDP every rank runs these steps itself (they are deterministic), so no weights need broadcasting.

The paper's ``single`` protocol (each edit on a fresh copy of the base model, then its own fine-tune) is N runs,
one per edit, with ``edits.single_index: i`` for i in 0..n_edit-1 (the same seed keeps the same selection):
``retention study`` with ``protocol: single`` runs them and pools their counts (``retention.study``).

With ``cache`` on, the known-fact selection and the edited weights are cached on disk by content (the base
model's weight fingerprint, the candidates, the editor, its resolved hyperparameters and the requests), so runs
that differ only after editing reuse one edit.

An edit made earlier replaces step 4 (so an edit of a large model is made once, not on every rank; every rank
loads the same files, so nothing is broadcast): ``precomputed`` names an output folder of ``retention edit``
(its facts are the edit set, its edited weights are loaded over the base model, which must be the one it
edited), ``edited_model`` an edited model folder whose weights are loaded over the base model, with
``knowledge`` naming the facts edited into it. Either way the control set is drawn as in a run that edits
(known to the base model, seeded, disjoint by subject and object from the given edit set), so a precomputed edit
of the facts a run would select gives that run's sets and numbers.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.tensor import DTensor
from typing_extensions import override

from retention.arch import ArchAdapter, unwrap_model
from retention.callbacks.pipeline import PipelineCallback, check_order
from retention.data.edit_folder import read_edit_folder
from retention.data.readers import read_records
from retention.data.selection import KnowledgeSets, select_known, split_edit_control
from retention.diskcache import DiskCache, digest
from retention.editing.base import EditRequest, RequestDiagnostics, run_edits
from retention.editing.registry import build_editor, editor_class, editor_hparams
from retention.models import model_fingerprint
from retention.paths import cache_dir
from retention.records import KnowledgeRecord
from retention.scoring import check_protocols

Mode = Literal["batch", "sequential", "single"]
SELECTION_CACHE_VERSION = 1
EDIT_CACHE_VERSION = 1
"""Bump when selection or editing changes what it computes, so cached entries are recomputed."""


def _diagnostics(d: RequestDiagnostics) -> dict:
    """One request's diagnostics as the run summary lists them."""
    return {"case_id": d.case_id, "seconds": d.seconds, "delta_norm": d.delta_norm,
            "relative_update": d.relative_update, **d.values}


class ApplyEdits(PipelineCallback):
    """Edits ``n_edit`` known facts into the base model and keeps ``n_control`` known facts as controls."""

    def __init__(
        self,
        knowledge: str = "builtin",
        n_edit: int = 0,
        n_control: int = 0,
        known_protocol: str = "top1",
        max_candidates: int | None = None,
        seed: int = 0,
        editor: str = "rome",
        hparams: str | dict[str, Any] | None = None,
        mode: Mode = "batch",
        batch_size: int = 1,
        single_index: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        cache: bool = True,
        precomputed: str | None = None,
        edited_model: str | None = None,
        controls: str | None = None,
    ):
        """
        Args:
            knowledge: a knowledge file (CounterFact, zsRE, our records) or a built-in set name (``builtin``).
            n_edit: facts to edit (the edit set E). With ``n_edit`` and ``n_control`` both 0 (the default) the
                callback does nothing: plain fine-tuning.
            n_control: known facts left untouched (the intrinsic control set I).
            known_protocol: keep facts the base model answers correctly under this protocol (top1, prob,
                token_acc, gen); ``none`` keeps every fact (random test models know nothing).
            max_candidates: score at most this many records (a seeded sample) when selecting known facts.
            seed: seed of the sample and of the edit/control split.
            editor: editor name (rome, memit, alphaedit, ft-l, ft-m) or the import path of an Editor subclass of
                your own (``package.module.Class``).
            hparams: the editor's hyperparameters: a YAML file, a preset name, or a mapping of fields that
                override the preset named after the model (``{layer: 4}`` keeps the preset's other fields); None
                for that preset (``retention/resources/editors/<editor>/<model>.yaml``; an editor of your own without one
                gets its hyperparameter class's defaults).
            mode: ``batch`` (one editor call) or ``sequential`` (calls of ``batch_size`` requests, each applied
                before the next); ``single`` edits only fact ``single_index`` (one run of the single protocol).
            batch_size: requests per editor call in ``sequential`` mode.
            single_index: with ``mode: single``, which of the ``n_edit`` selected facts this run edits.
            on_error: malformed knowledge records: ``raise`` (an error naming file, record and field) or ``skip``
                (skipped and counted).
            cache: reuse the known-fact selection and the edited weights of an earlier run with the same base
                weights, knowledge file, selection settings, editor, hyperparameters and edit requests (cached
                under ``$RETENTION_CACHE``; a study's arms that differ only after editing share one edit).
            precomputed: an output folder of ``retention edit`` (batch or sequential mode) whose edit the run uses
                instead of editing: its facts are the edit set, its edited weights are loaded over the base model
                (which must be the model it edited). ``editor`` must name its editor; ``hparams`` stays unset.
            edited_model: a model folder (safetensors) holding the base model with edits already in it: its
                weights are loaded over the base model after the control facts are selected, the weights that
                differ are the edited ones; ``knowledge`` names the facts edited into it (all of them are the
                edit set, measured as given, never filtered by ``known_protocol``).
            controls: with ``edited_model``, the source of the control facts (a file or ``builtin``), needed when
                ``n_control`` > 0. Otherwise controls come from ``knowledge``.
        """
        if n_edit < 0 or n_control < 0:
            raise ValueError(f"ApplyEdits: n_edit={n_edit}, n_control={n_control} must be >= 0")
        try:
            editor_class(editor)
        except ValueError as err:
            raise ValueError(f"ApplyEdits: {err}") from None
        if known_protocol != "none":
            check_protocols([known_protocol])
        if on_error not in ("raise", "skip"):
            raise ValueError(f"ApplyEdits: on_error {on_error!r} unknown; choose raise or skip")
        if batch_size < 1:
            raise ValueError(f"ApplyEdits: batch_size={batch_size} must be >= 1")
        if max_candidates is not None and max_candidates < n_edit + n_control:
            raise ValueError(f"ApplyEdits: max_candidates={max_candidates} cannot give n_edit + n_control = "
                             f"{n_edit + n_control} known facts")
        if mode not in ("batch", "sequential", "single"):
            raise ValueError(f"ApplyEdits: mode {mode!r} unknown; choose batch, sequential or single")
        if (mode == "single") != (single_index is not None):
            raise ValueError("ApplyEdits: mode 'single' needs single_index (and single_index needs mode 'single')")
        if single_index is not None and not 0 <= single_index < n_edit:
            raise ValueError(f"ApplyEdits: single_index={single_index} must be in 0..{n_edit - 1} (n_edit={n_edit})")
        self.precomputed_edit: dict | None = None
        """The ``precomputed`` folder as :func:`read_edit_folder` reads it."""
        self.given: list[KnowledgeRecord] | None = None
        """The edit set of an edit made earlier (``precomputed`` or ``edited_model``), in edit order."""
        self.given_report = None
        given = "precomputed" if precomputed is not None else "edited_model" if edited_model is not None else None
        if precomputed is not None and edited_model is not None:
            raise ValueError("ApplyEdits: precomputed and edited_model both give an edit made earlier; set one")
        if controls is not None and edited_model is None:
            raise ValueError("ApplyEdits: controls is only for edited_model (knowledge then holds the edited facts); "
                             "a run that edits, or uses precomputed, draws its controls from knowledge")
        if given is not None:
            if hparams is not None:
                raise ValueError(f"ApplyEdits: hparams is set, but {given} gives an edit already made; unset hparams")
            if mode == "single":
                raise ValueError(f"ApplyEdits: mode 'single' edits one fact per run; {given} gives an edit already made")
        if precomputed is not None:
            try:
                self.precomputed_edit = read_edit_folder(precomputed)
            except (OSError, ValueError) as err:
                raise ValueError(f"ApplyEdits: precomputed {precomputed!r}: {err}") from None
            made = self.precomputed_edit
            if editor != made["editor"]:
                raise ValueError(f"ApplyEdits: precomputed {precomputed!r} is a {made['editor']} edit, but editor is "
                                 f"{editor!r}: set editor: {made['editor']}")
            if mode not in ("batch", made["mode"]):
                raise ValueError(f"ApplyEdits: precomputed {precomputed!r} was edited in {made['mode']} mode, but mode "
                                 f"is {mode!r}: leave mode out")
            self.given = made["records"]
        if edited_model is not None:
            if not any(Path(edited_model).glob("*.safetensors")):
                raise ValueError(f"ApplyEdits: edited_model {edited_model!r} is not a model folder with safetensors "
                                 "weights")
            if n_control and controls is None:
                raise ValueError("ApplyEdits: edited_model with n_control > 0 needs controls, the source of the "
                                 "control facts (knowledge holds the edited facts), e.g. controls: builtin")
            self.given, self.given_report = read_records(knowledge, on_error=on_error)
        if self.given is not None and n_edit not in (0, len(self.given)):
            raise ValueError(f"ApplyEdits: n_edit={n_edit}, but {given} gives {len(self.given)} edited facts; leave "
                             "n_edit at 0 or set it to that number")
        self.knowledge = knowledge
        self.n_edit = len(self.given) if self.given is not None else n_edit
        self.n_control = n_control
        self.precomputed, self.edited_model, self.controls = precomputed, edited_model, controls
        self.known_protocol = known_protocol
        self.max_candidates = max_candidates
        self.seed = seed
        self.editor = editor
        self.hparams = hparams
        self.mode = mode
        self.batch_size = batch_size
        self.single_index = single_index
        self.on_error = on_error
        self.cache = cache
        self.fingerprint: str | None = None
        """The base model's weight fingerprint (cache keys and provenance), computed once per run."""
        self.reused: dict[str, bool] = {}
        """Which steps came from the cache: ``selection``, ``edit``."""
        self.sets = KnowledgeSets()
        self.edited_records: list[KnowledgeRecord] = []
        """The edit set as edited (with the phrasings the augmentation gave)."""
        self.edited_layers: list[int] = []
        self.edited_parameters: list[str] = []
        """Names (in the base model) of the weights the editor changed."""
        self.stats: dict[str, int] = {}
        """Counts for the run summary: ``read_records`` and ``skipped_records`` (malformed, under ``on_error:
        skip``), ``candidates`` (after ``max_candidates``) and ``known``."""
        self.timings: dict[str, float] = {}
        self.resolved_hparams: dict[str, Any] | None = None
        """The editor's hyperparameters as the edit used them (preset, file or mapping resolved)."""
        self.edit_diagnostics: list[dict] = []
        """Per edit request: seconds, update norm, relative update (‖ΔW‖/‖W‖ of its call) and the editor's own
        numbers (e.g. target probability)."""

    def describe(self) -> dict:
        """What this run edited and kept, for the run summary: the editor's hyperparameters as resolved (every
        field), and with an edit made earlier where it came from (for ``precomputed`` the editor, hyperparameters
        and mode it was made with)."""
        made = self.precomputed_edit
        given = self.hparams if self.resolved_hparams is None else self.resolved_hparams
        editor, hparams, mode = (self.editor, given, self.mode) if made is None else \
            (made["editor"], made["hparams"], made["mode"])
        if self.edited_model is not None:
            editor = hparams = mode = None
        earlier = {k: v for k, v in [("precomputed", self.precomputed), ("edited_model", self.edited_model),
                                     ("controls", self.controls)] if v is not None}
        return {
            "knowledge": self.knowledge, "known_protocol": self.known_protocol, "seed": self.seed,
            "editor": editor if self.sets.edit else None, "hparams": hparams, "mode": mode, **earlier,
            "n_edit": len(self.sets.edit), "n_control": len(self.sets.control), "edited_layers": self.edited_layers,
            "augmented_phrasings": sum(len(r.augmentations) for r in self.edited_records),
            "edit_case_ids": [r.case_id for r in self.sets.edit],
            "control_case_ids": [r.case_id for r in self.sets.control],
            "edit_diagnostics": self.edit_diagnostics, "reused": self.reused, "base_fingerprint": self.fingerprint,
        }

    def select(self, pl_module: LightningModule) -> KnowledgeSets:
        """Read, keep known facts, split into edit and control sets (with an edit made earlier: its facts, and
        controls drawn from the rest)."""
        t0 = time.perf_counter()
        source = self.controls if self.edited_model is not None else self.knowledge
        records, report = read_records(source, on_error=self.on_error) if source is not None else ([], None)
        if self.max_candidates is not None and len(records) > self.max_candidates:
            records = random.Random(self.seed).sample(records, self.max_candidates)
        if self.known_protocol == "none" or not records:  # no records: edited_model without controls
            known = list(records)
        else:
            known = self._known(pl_module, records)
        edit, control = split_edit_control(known, self.n_edit, self.n_control, self.seed, edit=self.given)
        if self.single_index is not None:
            edit = [edit[self.single_index]]
        reports = [r for r in (report, self.given_report) if r is not None]
        self.stats = {"candidates": len(records), "known": len(known), "read_records": sum(r.read for r in reports),
                      "skipped_records": sum(r.skipped for r in reports)}
        self.timings["select_s"] = time.perf_counter() - t0
        rank_zero_info(f"{self.knowledge}: {len(known)} of {len(records)} facts known under {self.known_protocol}; "
                       f"{len(edit)} to edit, {len(control)} controls ({self.timings['select_s']:.1f} s)")
        return KnowledgeSets(edit, control)

    def _known(self, pl_module: LightningModule, records: list[KnowledgeRecord]) -> list[KnowledgeRecord]:
        """The records the base model knows, from the selection cache when the same selection ran before."""
        cache = DiskCache(cache_dir() / "selection")
        key = {"version": SELECTION_CACHE_VERSION, "model": self.fingerprint, "protocol": self.known_protocol,
               "records": digest([dataclasses.asdict(r) for r in records])}
        hit = cache.get(key) if self.cache else None
        self.reused["selection"] = hit is not None
        if hit is not None:
            known_ids = set(hit[0]["known"])
            return [r for r in records if str(r.case_id) in known_ids]
        known = select_known(pl_module.model, pl_module.tokenizer, records, self.known_protocol)
        if self.cache:
            cache.put(key, {"known": [str(r.case_id) for r in known]})
        return known

    def _exclude_from_task(self, trainer: Trainer) -> None:
        if hasattr(trainer.datamodule, "exclude_terms"):
            trainer.datamodule.exclude_terms = self.sets.terms()

    def edit(self, pl_module: LightningModule) -> None:
        """Apply the edits of the edit set to ``pl_module.model``."""
        t0 = time.perf_counter()
        editor = build_editor(self.editor, self.hparams, getattr(pl_module, "model_name", None))
        self.resolved_hparams = editor.hparams.to_dict()
        requests = [EditRequest.from_record(r) for r in self.edited_records]
        mode = "batch" if self.mode == "single" else self.mode
        cache = DiskCache(cache_dir() / "edits")
        key = {"version": EDIT_CACHE_VERSION, "model": self.fingerprint, "editor": self.editor,
               "hparams": editor.hparams.to_dict(), "mode": mode, "batch_size": self.batch_size,
               "requests": [dataclasses.asdict(r) for r in requests]}
        hit = cache.get(key) if self.cache else None
        self.reused["edit"] = hit is not None
        base = unwrap_model(pl_module.model)
        if hit is not None:
            payload, weights = hit
            with torch.no_grad():
                for name, value in weights.items():
                    base.get_parameter(name).copy_(value)
            self.edited_layers, self.edit_diagnostics = payload["layers"], payload["diagnostics"]
            self.edited_parameters = sorted(weights)
        else:
            editor.prepare(pl_module.model, pl_module.tokenizer, self.fingerprint)
            results = run_edits(editor, pl_module.model, pl_module.tokenizer, requests, mode, self.batch_size)
            self.edited_layers = sorted({i for r in results for i in r.layers})
            self.edit_diagnostics = [_diagnostics(d) for r in results for d in r.diagnostics]
            self.edited_parameters = sorted({n for r in results for n in r.deltas})
            if self.cache:
                # The edited weights themselves, not the deltas: W0 + (d1 + d2) is not (W0 + d1) + d2 in floats,
                # and a reused edit must give the model the editor left, bit for bit.
                cache.put(key, {"layers": self.edited_layers, "diagnostics": self.edit_diagnostics},
                          {n: base.get_parameter(n).detach() for n in self.edited_parameters})
        self.timings["edit_s"] = time.perf_counter() - t0
        where = next(pl_module.model.parameters())
        how = "reused from the edit cache" if hit is not None else "edited"
        rank_zero_info(f"{self.editor} ({self.mode}): {len(requests)} edits in layers {self.edited_layers} {how} "
                       f"({self.timings['edit_s']:.1f} s on {where.device}, {where.dtype})")

    def load_edit(self, pl_module: LightningModule) -> None:
        """Load the edit made earlier (``precomputed`` or ``edited_model``) into ``pl_module.model``."""
        t0 = time.perf_counter()
        base = unwrap_model(pl_module.model)
        if self.precomputed_edit is not None:
            self._load_precomputed(base)
        else:
            self._load_edited_model(base)
        self.timings["edit_s"] = time.perf_counter() - t0
        rank_zero_info(f"{len(self.edited_records)} edits in layers {self.edited_layers} loaded from "
                       f"{self.precomputed or self.edited_model} ({self.timings['edit_s']:.1f} s)")

    def _load_precomputed(self, base: torch.nn.Module) -> None:
        from safetensors.torch import load_file

        made = self.precomputed_edit
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(base)
        if self.fingerprint != made["base_fingerprint"]:
            raise ValueError(f"edits.precomputed {self.precomputed}: edited another base model (weight fingerprint "
                             f"{made['base_fingerprint']}, this model's {self.fingerprint}); give the model "
                             "`retention edit` edited as model.model_name, in float32")
        weights = load_file(str(made["weights"]))
        with torch.no_grad():
            for name, value in weights.items():
                base.get_parameter(name).copy_(value)
        self.edited_parameters = sorted(weights)
        self.edited_layers = list(made["layers"])
        self.edit_diagnostics = [_diagnostics(RequestDiagnostics(**d)) for d in made["diagnostics"]]

    def _load_edited_model(self, base: torch.nn.Module) -> None:
        """Copy the edited model's weights that differ from the base model's (compared in the edited model's
        dtype, so a bfloat16 copy of an float32 base changes only its edited weights)."""
        from safetensors import safe_open

        folder = Path(self.edited_model)
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
        self.edited_parameters = sorted(n for n in changed if n in params)
        self.edited_layers = sorted({i for n in self.edited_parameters if (i := arch.layer_index_of(n)) is not None})

    def _edited_weights(self, pl_module: LightningModule) -> dict[str, torch.nn.Parameter]:
        """The edited weights as parameters of the (possibly adapter-wrapped) model, by base-model name."""
        base = unwrap_model(pl_module.model)
        out = {}
        for name in self.edited_parameters:
            module_name, _, leaf = name.rpartition(".")
            module = base.get_submodule(module_name)
            out[name] = getattr(getattr(module, "base_layer", module), leaf)  # a peft layer wraps the original
        return out

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """The sets by case id, and the edited weights that are not trained (a light checkpoint leaves them
        out), so a resume gets the edited model back bit for bit whatever the editor does on the second run."""
        if not self.active:
            return
        checkpoint["retention_edits"] = {
            "edit": [str(r.case_id) for r in self.sets.edit], "control": [str(r.case_id) for r in self.sets.control],
            # An FSDP2 checkpoint holds every weight already (FineTuneModule.on_save_checkpoint), as shards.
            "frozen_edited_weights": {n: p.detach().cpu() for n, p in self._edited_weights(pl_module).items()
                                      if not p.requires_grad and not isinstance(p, DTensor)},
        }

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get("retention_edits")
        if not self.active or state is None:
            return
        for name in ("edit", "control"):
            ours = [str(r.case_id) for r in getattr(self.sets, name)]
            if ours != state[name]:
                raise ValueError(
                    f"the checkpoint's {name} set ({len(state[name])} facts) is not this run's ({len(ours)} facts, "
                    f"first difference at {next((i for i, (a, b) in enumerate(zip(ours, state[name])) if a != b), 0)}): "
                    "the knowledge file, the model or the selection settings changed since it was written"
                )
        weights = self._edited_weights(pl_module)
        with torch.no_grad():
            for name, value in state["frozen_edited_weights"].items():
                weights[name].copy_(value)

    def editor_layers(self, model_name: str) -> list[int] | None:
        """Resolve the editor's hyperparameters (preset, file or mapping: errors name the bad field) without the
        model, and return the layers they name (None: no edit, or ``located``)."""
        if self.precomputed_edit is not None:
            return list(self.precomputed_edit["layers"])
        if not self.n_edit or self.edited_model is not None:
            return None
        hparams = editor_hparams(self.editor, self.hparams, model_name).to_dict()
        layers = hparams.get("layers", hparams.get("layer"))
        return [layers] if isinstance(layers, int) else layers if isinstance(layers, list) else None

    @property
    def active(self) -> bool:
        return self.n_edit + self.n_control > 0

    @override
    def on_base_model_ready(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active:
            return
        pipeline = check_order(trainer.callbacks)
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(unwrap_model(pl_module.model))
        self.sets = self.select(pl_module)
        self._exclude_from_task(trainer)
        # Augmentation is opt-in (ParaphraseAugmentation): the records' own phrasings are not used by default.
        records = [dataclasses.replace(r, augmentations=[]) for r in self.sets.edit]
        for callback in pipeline:
            records = callback.on_before_edits(trainer, pl_module, records) or records
        if self.given is not None:
            if any(r.augmentations for r in records):
                raise ValueError(f"paraphrases.k: augmentation phrasings are used while editing, and edits."
                                 f"{'precomputed' if self.precomputed else 'edited_model'} gives an edit already made")
            self.edited_records = list(self.sets.edit)
            self.load_edit(pl_module)
        else:
            self.edited_records = records
            if records:
                self.edit(pl_module)
        state = pl_module.pipeline
        state.sets, state.edited_layers = self.sets, list(self.edited_layers)
        state.edit = self.describe()
        state.stats.update(self.stats)
        state.timings.update(self.timings)
        for callback in pipeline:
            callback.on_edits_applied(trainer, pl_module, self.sets)
