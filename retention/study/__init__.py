"""Studies: a grid of ``retention fit`` runs (arms x seeds, or the single-edit protocol) run as one resumable
command, and the report over seeds with confidence intervals."""

from retention.study.runner import Study
from retention.study.spec import StudyError, StudyRun, StudySpec

__all__ = ["Study", "StudyError", "StudyRun", "StudySpec"]
