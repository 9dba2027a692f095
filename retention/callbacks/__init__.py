"""The retention pipeline as Lightning callbacks, each one concern (see ``docs/pipeline.md``).

Besides Lightning's hooks they share three of their own and one typed state: :mod:`retention.pipeline_contract`.
"""

from lightning.pytorch import Callback

from retention.callbacks.after_finetune import EditAfterFineTune
from retention.callbacks.anchor import AnchorEdits
from retention.callbacks.apply_edits import ApplyEdits
from retention.callbacks.augmentation import ParaphraseAugmentation
from retention.callbacks.freeze import FreezeLayers
from retention.callbacks.monitor import RetentionMonitor
from retention.callbacks.rehearsal import Rehearsal
from retention.callbacks.report import RunReport
from retention.pipeline_contract import PipelineCallback, PipelineState

PIPELINE: dict[str, type[Callback]] = {
    "edits": ApplyEdits,
    "paraphrases": ParaphraseAugmentation,
    "freeze": FreezeLayers,
    "rehearsal": Rehearsal,
    "anchor": AnchorEdits,
    "monitor": RetentionMonitor,
    "after": EditAfterFineTune,
    "report": RunReport,
}
"""Config key -> pipeline callback, in the order ``retention fit`` adds them to the trainer."""

__all__ = ["PIPELINE", "AnchorEdits", "ApplyEdits", "EditAfterFineTune", "FreezeLayers", "ParaphraseAugmentation",
           "PipelineCallback", "PipelineState", "Rehearsal", "RetentionMonitor", "RunReport"]
