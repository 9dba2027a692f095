"""ApplyEdits: select known facts, split them into edit and control sets, edit, hand over to measurement.

Runs in ``on_base_model_ready``, which the FineTuneModule calls from ``configure_model``: after the base model is
loaded and before adapters, freezing and the strategy's wrap/shard, so the edits land in plain weights. Steps:

1. select (:mod:`~retention.callbacks.edit_selection`): read the knowledge source, keep the facts the base model
   knows (``known_protocol``; ``none`` keeps all, for tests on random tiny models), split them (seeded, disjoint
   by subject and object) into ``n_edit`` facts to edit and ``n_control`` facts left untouched; give their
   subjects and objects to the datamodule's ``exclude_terms`` (it drops the examples that mention them when it
   builds its loaders);
2. call ``on_before_edits(trainer, pl_module, records)`` on the pipeline callbacks (paraphrase augmentation
   returns the records with their editing phrasings; without it edits use no augmentation);
3. apply the edit (:mod:`~retention.callbacks.edit_source`): made here in ``batch``, ``sequential`` or ``single``
   mode (a single-protocol run with the edit cache edits all its seed's facts together and caches each), or
   an edit made earlier (``precomputed``, ``edited_model``); write the sets, the edited layers, what was edited,
   the counts and the timings to the module's :class:`~retention.pipeline_contract.PipelineState`. With
   ``state.edit_later`` (an edit after fine-tuning, EditAfterFineTune) it first sets the editor up on the base
   model and hands over ``state.edit_again``; with ``state.defer_edits`` it edits nothing now;
4. call ``on_edits_applied(trainer, pl_module, sets)`` on the pipeline callbacks (the RetentionMonitor measures
   t=0 there).

Under DDP every rank runs these steps itself (they are deterministic), so no weights need broadcasting.

The paper's ``single`` protocol (each edit on a fresh copy of the base model, then its own fine-tune) is N runs,
one per edit, with ``edits.single_index: i`` for i in 0..n_edit-1 (the same seed keeps the same selection):
``retention study`` with ``protocol: single`` runs them and pools their counts (``retention.study``). With
``cache`` on, the first of a seed's runs edits all n_edit facts, each alone on the base model but with their
targets optimised together (:meth:`~retention.editing.base.Editor.edit_singles`), and caches each fact's edited
weights; the seed's other runs read theirs.

With ``cache`` on, the known-fact selection and the edited weights are cached on disk by content (the base
model's weight fingerprint, the candidates, the editor, its resolved hyperparameters and the requests), so runs
that differ only after editing reuse one edit.

With an edit made earlier the control set is drawn as in a run that edits (known to the base model, seeded,
disjoint by subject and object from the given edit set), so a precomputed edit of the facts a run would select
gives that run's sets and numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from retention.arch import unwrap_model
from retention.callbacks.edit_selection import FactSelectionArgs, Selection, select_facts
from retention.callbacks.edit_source import (
    AppliedEdit,
    EarlierEditArgs,
    EditedModel,
    EditHere,
    EditingArgs,
    EditSource,
    PrecomputedEdit,
)
from retention.editing.memory import Memory, attached
from retention.editing.registry import build_editor
from retention.models import model_fingerprint
from retention.pipeline_contract import PipelineCallback, PipelineState, pipeline_callbacks
from retention.records import KnowledgeRecord


@dataclass
class EditsArgs(EarlierEditArgs, EditingArgs, FactSelectionArgs):
    """ApplyEdits' options (config key ``edits``): its three groups as one flat set of fields, so the keys stay
    ``edits.n_edit``, ``edits.editor``, ``edits.precomputed``: study grids, run names, the ``config.yaml`` of
    earlier runs and the config that checkpoints record name them so."""

    cache: bool = True
    """Reuse the known-fact selection and the edited weights of an earlier run with the same base weights,
    knowledge file, selection settings, editor, hyperparameters and edit requests (cached under
    ``$RETENTION_CACHE``; a study's arms that differ only after editing share one edit)."""

    def __post_init__(self) -> None:
        FactSelectionArgs.__post_init__(self)
        EditingArgs.__post_init__(self)
        EarlierEditArgs.__post_init__(self)
        if self.single_index is not None and not 0 <= self.single_index < self.n_edit:
            raise ValueError(f"ApplyEdits: single_index={self.single_index} must be in 0..{self.n_edit - 1} "
                             f"(n_edit={self.n_edit})")
        if self.earlier is not None:
            if self.hparams is not None:
                raise ValueError(f"ApplyEdits: hparams is set, but {self.earlier} gives an edit already made; "
                                 "unset hparams")
            if self.mode == "single":
                raise ValueError(f"ApplyEdits: mode 'single' edits one fact per run; {self.earlier} gives an edit "
                                 "already made")
        if self.edited_model is not None and self.n_control and self.controls is None:
            raise ValueError("ApplyEdits: edited_model with n_control > 0 needs controls, the source of the "
                             "control facts (knowledge holds the edited facts), e.g. controls: builtin")

    def edit_source(self) -> EditSource:
        """Where the edit comes from: made here, ``precomputed`` or ``edited_model``."""
        if self.precomputed is not None:
            source: EditSource = PrecomputedEdit(self.precomputed, self)
        elif self.edited_model is not None:
            source = EditedModel(self.edited_model, self.knowledge, self.on_error)
        else:
            return EditHere(self, self.cache)
        if self.n_edit not in (0, len(source.edit_set)):
            raise ValueError(f"ApplyEdits: n_edit={self.n_edit}, but {self.earlier} gives {len(source.edit_set)} "
                             "edited facts; leave n_edit at 0 or set it to that number")
        return source


class ApplyEdits(PipelineCallback):
    """Edits ``n_edit`` known facts into the base model and keeps ``n_control`` known facts as controls."""

    def __init__(self, **options: Any):
        """Options: the fields of :class:`EditsArgs` (config key ``edits``)."""
        self.args = EditsArgs(**options)
        self.source = self.args.edit_source()
        self.edited_parameters: list[str] = []
        """Names (in the base model) of the weights the edit changed: what a checkpoint restores."""

    @property
    def n_edit(self) -> int:
        """Facts to edit: ``n_edit``, or the number an edit made earlier holds."""
        given = self.source.edit_set
        return len(given) if given is not None else self.args.n_edit

    @property
    def active(self) -> bool:
        return self.n_edit + self.args.n_control > 0

    def editor_layers(self, model_name: str) -> list[int] | None:
        """Resolve the editor's hyperparameters (preset, file or mapping: errors name the bad field) without the
        model, and return the layers they name (None: no edit, ``located``, or an edited model)."""
        if not self.n_edit:
            return None
        return self.source.layers(model_name)

    def select(self, pl_module: LightningModule, fingerprint: str | None = None) -> Selection:
        """Read, keep known facts, split into edit and control sets (with an edit made earlier: its facts, and
        controls drawn from the rest)."""
        args = self.args
        return select_facts(args, pl_module, fingerprint,
                            candidates=args.controls if args.edited_model is not None else args.knowledge,
                            edit_set=self.source.edit_set, edit_set_report=self.source.edit_set_report,
                            single_index=args.single_index, cache=args.cache)

    def describe(self, selection: Selection, applied: AppliedEdit | None, edited: list[KnowledgeRecord],
                 fingerprint: str) -> dict:
        """What this run edited and kept, for the run summary: the editor's hyperparameters as resolved (every
        field), and with an edit made earlier where it came from (for ``precomputed`` the editor, hyperparameters
        and mode it was made with)."""
        args, sets = self.args, selection.sets
        editor, hparams, mode = self.source.made_with(applied)
        earlier = {k: v for k, v in [("precomputed", args.precomputed), ("edited_model", args.edited_model),
                                     ("controls", args.controls)] if v is not None}
        reused = {step: hit for step, hit in [("selection", selection.cache_hit),
                                              ("edit", applied.cache_hit if applied else None)] if hit is not None}
        return {
            "knowledge": args.knowledge, "known_protocol": args.known_protocol, "seed": args.seed,
            "editor": editor if sets.edit else None, "hparams": hparams, "mode": mode, **earlier,
            "n_edit": len(sets.edit), "n_control": len(sets.control),
            "edited_layers": applied.layers if applied else [],
            "augmented_phrasings": sum(len(r.augmentations) for r in edited),
            "edit_case_ids": [r.case_id for r in sets.edit], "control_case_ids": [r.case_id for r in sets.control],
            "edit_diagnostics": applied.diagnostics if applied else [], "reused": reused,
            "base_fingerprint": fingerprint,
        }

    def check_later_edit(self, state: PipelineState) -> None:
        """Refuse an edit after fine-tuning (``state.edit_later``) that this run cannot make: none to make, or
        one made elsewhere."""
        if not state.edit_later:
            return
        if self.args.earlier is not None:
            raise ValueError(f"after.mode: edits.{self.args.earlier} gives an edit made elsewhere, which this run "
                             "cannot make again after fine-tuning; edit here (editor, hparams) or set after.mode none")
        if not self.n_edit:
            raise ValueError("after.mode edits after fine-tuning, but edits.n_edit is 0: nothing to edit")

    @override
    def on_base_model_ready(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = pl_module.pipeline
        self.check_later_edit(state)
        if not self.active:
            return
        pipeline = pipeline_callbacks(trainer.callbacks)
        fingerprint = model_fingerprint(unwrap_model(pl_module.model))
        selection = self.select(pl_module, fingerprint)
        sets = selection.sets
        if hasattr(trainer.datamodule, "exclude_terms"):
            trainer.datamodule.exclude_terms = sets.terms()
        # Augmentation is opt-in (ParaphraseAugmentation): the records' own phrasings are not used by default.
        # A single-protocol run with the edit cache edits its seed's facts together (EditHere), so they all get
        # their phrasings; augmentation is per fact, so the run's own fact gets the ones it would get alone.
        together = self.args.mode == "single" and self.args.cache
        records = [dataclasses.replace(r, augmentations=[]) for r in (selection.seed_edit if together else sets.edit)]
        for callback in pipeline:
            records = callback.on_before_edits(trainer, pl_module, records) or records
        singles = records if together else None
        if together:
            records = [records[self.args.single_index]]
        if self.source.edit_set is not None:
            if any(r.augmentations for r in records):
                raise ValueError(f"paraphrases.k: augmentation phrasings are used while editing, and "
                                 f"edits.{self.args.earlier} gives an edit already made")
            records = list(sets.edit)
        if state.edit_later:
            state.edit_again = self.prepare_later_edit(pl_module, records, fingerprint)
        applied = self.source.apply(pl_module, records, fingerprint, singles) if records and not state.defer_edits \
            else None
        self.edited_parameters = applied.parameters if applied else []
        state.sets, state.edited_layers = sets, list(applied.layers) if applied else []
        state.edit = self.describe(selection, applied, records, fingerprint)
        state.stats.update(selection.stats)
        state.timings.update({"select_s": selection.seconds} | ({"edit_s": applied.seconds} if applied else {}))
        for callback in pipeline:
            callback.on_edits_applied(trainer, pl_module, sets)

    def prepare_later_edit(self, pl_module: LightningModule, records: list[KnowledgeRecord],
                           fingerprint: str) -> Callable[[nn.Module], AppliedEdit]:
        """Set the editor up on the base model (still unedited: its key statistics, context templates and located
        layers go to the caches keyed by ``fingerprint``) and return what makes the edit of ``records`` in another
        model with that set-up. No edit cache there: its key would be the base model's."""
        model_name = getattr(pl_module, "model_name", None)
        hparams = self.source.hparams(model_name)
        build_editor(self.args.editor, hparams, model_name).prepare(pl_module.model, pl_module.tokenizer, fingerprint)
        later = EditHere(self.args, cache=False)
        tokenizer = pl_module.tokenizer

        def edit_again(model: nn.Module) -> AppliedEdit:
            return later.apply(SimpleNamespace(model=model, tokenizer=tokenizer, model_name=model_name), records,
                               fingerprint)

        return edit_again

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """The sets by case id, and the edited weights that are not trained (a light checkpoint leaves them
        out), so a resume gets the edited model back bit for bit whatever the editor does on the second run."""
        if not self.active:
            return
        sets = pl_module.pipeline.sets
        weights = {name: _trained_view(pl_module, name) for name in self.edited_parameters}
        checkpoint["retention_edits"] = {
            "edit": [str(r.case_id) for r in sets.edit], "control": [str(r.case_id) for r in sets.control],
            # An FSDP2 checkpoint holds every weight already (FineTuneModule.on_save_checkpoint), as shards.
            "frozen_edited_weights": {n: p.detach().cpu() for n, p in weights.items()
                                      if not p.requires_grad and not isinstance(p, DTensor)},
            # A memory's buffers are not persistent (no state_dict holds them): kept here, a resume attaches them
            # bit for bit whatever the re-made edit gives on other hardware.
            "memories": {name: {"kind": m.kind, "meta": m.meta,
                                "tensors": {k: b.detach().cpu().clone() for k, b in m.named_buffers(recurse=False)}}
                         for name, m in _memories(pl_module).items()},
        }

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get("retention_edits")
        if not self.active or state is None:
            return
        for name in ("edit", "control"):
            ours = [str(r.case_id) for r in getattr(pl_module.pipeline.sets, name)]
            if ours != state[name]:
                raise ValueError(
                    f"the checkpoint's {name} set ({len(state[name])} facts) is not this run's ({len(ours)} facts, "
                    f"first difference at {next((i for i, (a, b) in enumerate(zip(ours, state[name])) if a != b), 0)}): "
                    "the knowledge file, the model or the selection settings changed since it was written"
                )
        with torch.no_grad():
            for name, value in state["frozen_edited_weights"].items():
                _trained_view(pl_module, name).copy_(value)
        if "memories" in state:
            _restore_memories(_memories(pl_module), state["memories"])


def _memories(pl_module: LightningModule) -> dict[str, Memory]:
    """Module name -> the edit memory attached to it (GRACE, WISE), in the unwrapped model."""
    base = unwrap_model(pl_module.model)
    return {name: memory for name, module in base.named_modules() if (memory := attached(module)) is not None}


def _restore_memories(ours: dict[str, Memory], saved: dict[str, dict]) -> None:
    """Put the checkpoint's memories into the ones this run attached (same modules and kinds), buffers and fields."""
    if sorted(ours) != sorted(saved):
        raise ValueError(f"the checkpoint holds edit memories at {sorted(saved) or 'no module'}, this run at "
                         f"{sorted(ours) or 'no module'}: the editor or its layer changed since it was written")
    for name, memory in ours.items():
        if memory.kind != saved[name]["kind"]:
            raise ValueError(f"the checkpoint's memory at {name} is a {saved[name]['kind']} memory, this run's a "
                             f"{memory.kind} memory: the editor changed since it was written")
        device = next(memory.buffers(), torch.empty(0)).device
        for key, value in saved[name]["tensors"].items():
            memory.register_buffer(key, value.to(device), persistent=False)
        memory.meta = dict(saved[name]["meta"])


def _trained_view(pl_module: LightningModule, name: str) -> torch.nn.Parameter:
    """The base model's weight ``name`` as a parameter of the (possibly adapter-wrapped) model."""
    module_name, _, leaf = name.rpartition(".")
    module = unwrap_model(pl_module.model).get_submodule(module_name)
    return getattr(getattr(module, "base_layer", module), leaf)  # a peft layer wraps the original
