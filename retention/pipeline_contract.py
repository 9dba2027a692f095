"""The pipeline's contract: three hooks of its own, one typed state the callbacks share (with the measurements it
holds), and a checked order.

Besides Lightning's hooks, pipeline callbacks receive, in callback order:

- ``on_base_model_ready(trainer, pl_module)``: the FineTuneModule calls it from ``configure_model`` after loading
  the base model, before adapters, freezing and the strategy's wrap (ApplyEdits edits here, FreezeLayers decides);
- ``on_before_edits(trainer, pl_module, records) -> records | None``: ApplyEdits calls it with the edit set before
  editing, while the model is still the base model (ParaphraseAugmentation adds phrasings here);
- ``on_edits_applied(trainer, pl_module, sets)``: ApplyEdits calls it after editing, or after selecting when the
  edits are deferred (:attr:`PipelineState.defer_edits`); RetentionMonitor measures t=0 there.

They hand each other data only through the module's :class:`PipelineState`. This module sits below both the
callbacks (``retention.callbacks``) and the module that calls them (``retention.modules.finetune``); it imports
Lightning only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

if TYPE_CHECKING:
    from torch import nn

    from retention.data.selection import KnowledgeSets
    from retention.metrics import Rates
    from retention.records import KnowledgeRecord, Probe
    from retention.scoring import ProbeResult


@dataclass
class ScoreSettings:
    """How the probes are scored (the RetentionMonitor's settings; every measurement of a run scores alike)."""

    protocols: tuple[str, ...] = ("top1", "prob", "gen")
    batch_size: int = 16
    max_new_tokens: int = 10
    precision: Literal["32", "bf16"] = "32"
    """``32``, or ``bf16``: score under autocast to bfloat16 (:mod:`retention.scoring`)."""


@dataclass
class Measurement:
    """One measurement of the probe sets: rates (all ranks) and per-probe results (rank 0 only)."""

    step: int
    rates: Rates
    seconds: float
    results: list[ProbeResult] | None = None

    def to_dict(self) -> dict:
        return {"step": self.step, "seconds": self.seconds, **self.rates}


@dataclass
class AfterFineTune:
    """An edit made on the fine-tuned weights (again, or for the first time) and the measurement of it."""

    mode: str
    """``reedit`` (the run's edit made again) or ``only_after`` (the run's only edit)."""
    measurement: Measurement
    """Rates vs t=0 (and per-probe results on rank 0) of the fine-tuned model with the edit."""
    edit_seconds: float

    def to_dict(self) -> dict:
        """The ``after_finetune`` block of ``summary.json``."""
        m = self.measurement
        return {"mode": self.mode, "step": m.step, "edit_seconds": self.edit_seconds, "measure_seconds": m.seconds,
                "accuracy": m.rates["accuracy"], "retention": m.rates["retention"]}


@dataclass
class PipelineState:
    """What the pipeline callbacks hand each other; the FineTuneModule owns it (``pl_module.pipeline``)."""

    sets: KnowledgeSets | None = None
    """The edit and control sets, once ApplyEdits has selected them."""
    edited_layers: list[int] = field(default_factory=list)
    """Decoder layers the edits changed (set by ApplyEdits)."""
    frozen_layers: set[int] = field(default_factory=set)
    """Decoder layers kept frozen during fine-tuning (set by FreezeLayers)."""
    edit: dict[str, Any] = field(default_factory=dict)
    """What was edited and how, for the run summary (set by ApplyEdits: knowledge, editor, resolved
    hyperparameters, mode, case ids, per-edit diagnostics, cache reuse)."""
    stats: dict[str, int] = field(default_factory=dict)
    """Counts for the run summary (records read and skipped, candidates, known facts, top1-blind edits)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of the pipeline's steps before fine-tuning (``select_s``, ``edit_s``)."""
    protocols: tuple[str, ...] = ()
    """The protocols the measurements score (set by RetentionMonitor)."""
    measurements: list[Measurement] = field(default_factory=list)
    """t=0 and every later measurement, in step order (RetentionMonitor appends; on resume it refills the list)."""
    score_settings: ScoreSettings | None = None
    """How the measurements score the probes (set in ``setup`` by RetentionMonitor; ``None`` without it). A later
    measurement against t=0 (EditAfterFineTune's) scores alike."""
    probes: list[Probe] = field(default_factory=list)
    """The probes of the edit and control sets, in the order the measurements score them (set by
    RetentionMonitor when the edits are applied)."""
    baseline: list[ProbeResult] = field(default_factory=list)
    """This rank's t=0 results (its shard of :attr:`probes`), the baseline of every later measurement (set by
    RetentionMonitor when it measures t=0)."""
    freeze_policy: str = "none"
    """FreezeLayers' policy (set in ``setup`` by FreezeLayers; ``none`` without it): EditAfterFineTune's
    ``only_after`` refuses the policies that freeze by the edited layers."""
    defer_edits: bool = False
    """Select the facts but leave the base model unedited: they are edited after fine-tuning (set in ``setup`` by
    EditAfterFineTune's ``only_after``; ApplyEdits respects it, so t=0 is the unedited model)."""
    edit_later: bool = False
    """The edit is made (again) after fine-tuning (set in ``setup`` by EditAfterFineTune): ApplyEdits prepares the
    editor on the base model even when its edit comes from the edit cache (the later edit reads the base model's
    key statistics from the caches keyed by its fingerprint) and sets :attr:`edit_again`."""
    edit_again: Callable[[nn.Module], Any] | None = None
    """Makes the run's edit (the same requests, editor, resolved hyperparameters and mode) in another model, e.g.
    a copy of the fine-tuned one, with the base model's editor set-up; returns what it changed (an
    ``AppliedEdit``). Set by ApplyEdits under :attr:`edit_later`."""
    after: AfterFineTune | None = None
    """The edit made after fine-tuning and its measurement (set by EditAfterFineTune)."""


class PipelineCallback(Callback):
    """A callback of the retention pipeline: the three pipeline hooks as no-ops, and the callbacks it must follow.

    A callback of your own that drops edits of long subjects, to run after ApplyEdits has selected the facts:

    >>> class ShortSubjectsOnly(PipelineCallback):
    ...     runs_after = ("ApplyEdits",)
    ...     def on_before_edits(self, trainer, pl_module, records):
    ...         return [r for r in records if len(r.subject) <= 20]
    >>> class ApplyEdits(PipelineCallback): ...
    >>> [type(cb).__name__ for cb in check_order([ApplyEdits(), ShortSubjectsOnly()])]
    ['ApplyEdits', 'ShortSubjectsOnly']
    >>> check_order([ShortSubjectsOnly(), ApplyEdits()])
    Traceback (most recent call last):
    ValueError: ApplyEdits must come before ShortSubjectsOnly in trainer.callbacks (ShortSubjectsOnly reads what ApplyEdits sets); reorder the callbacks
    """

    runs_after: ClassVar[tuple[str, ...]] = ()
    """Names of pipeline callback classes that, when present, must come earlier in ``trainer.callbacks``."""

    def on_base_model_ready(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The base model is loaded (not yet wrapped, adapted or frozen)."""

    def on_before_edits(self, trainer: Trainer, pl_module: LightningModule,
                        records: list[KnowledgeRecord]) -> list[KnowledgeRecord] | None:
        """The edit set, before editing; return a replacement list, or ``None`` to keep it."""
        return None

    def on_edits_applied(self, trainer: Trainer, pl_module: LightningModule, sets: KnowledgeSets) -> None:
        """The edits are in the model."""


def pipeline_callbacks(callbacks: Sequence[Callback]) -> list[PipelineCallback]:
    """The pipeline callbacks among ``callbacks``, in their order (the order their hooks are called in)."""
    return [cb for cb in callbacks if isinstance(cb, PipelineCallback)]


def check_order(callbacks: Sequence[Callback]) -> list[PipelineCallback]:
    """:func:`pipeline_callbacks`, after checking each comes after those it names in ``runs_after``."""
    pipeline = pipeline_callbacks(callbacks)
    position = {type(cb).__name__: i for i, cb in enumerate(pipeline)}
    for i, cb in enumerate(pipeline):
        for before in cb.runs_after:
            if position.get(before, -1) > i:
                raise ValueError(f"{before} must come before {type(cb).__name__} in trainer.callbacks "
                                 f"({type(cb).__name__} reads what {before} sets); reorder the callbacks")
    return pipeline
