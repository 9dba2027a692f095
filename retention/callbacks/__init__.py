"""The retention pipeline as Lightning callbacks, each one concern (see ``docs/pipeline.md``).

Besides Lightning's hooks they use three of their own, called in callback order:

- ``on_base_model_ready(trainer, pl_module)``: the FineTuneModule calls it from ``configure_model`` after loading
  the base model, before adapters, freezing and the strategy's wrap (ApplyEdits edits here, FreezeLayers decides);
- ``on_before_edits(trainer, pl_module, records) -> records | None``: ApplyEdits calls it with the edit set before
  editing, while the model is still the base model (ParaphraseAugmentation adds phrasings here);
- ``on_edits_applied(trainer, pl_module, sets)``: ApplyEdits calls it after editing (RetentionMonitor measures t=0).
"""

from lightning.pytorch import Callback

from retention.callbacks.apply_edits import ApplyEdits
from retention.callbacks.augmentation import ParaphraseAugmentation
from retention.callbacks.freeze import FreezeLayers
from retention.callbacks.monitor import RetentionMonitor
from retention.callbacks.report import RunReport

PIPELINE: dict[str, type[Callback]] = {
    "edits": ApplyEdits,
    "paraphrases": ParaphraseAugmentation,
    "freeze": FreezeLayers,
    "monitor": RetentionMonitor,
    "report": RunReport,
}
"""Config key -> pipeline callback, in the order ``retention fit`` adds them to the trainer."""

__all__ = ["PIPELINE", "ApplyEdits", "FreezeLayers", "ParaphraseAugmentation", "RetentionMonitor", "RunReport"]
