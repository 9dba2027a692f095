"""The pipeline's contract: hooks dispatched by type, the callbacks' order checked."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor

from retention.callbacks.pipeline import PipelineCallback, check_order


class Edits(PipelineCallback):
    pass


class Freeze(PipelineCallback):
    runs_after = ("Edits",)


def test_check_order_keeps_pipeline_callbacks_in_order_and_ignores_others():
    edits, freeze, other = Edits(), Freeze(), LearningRateMonitor()
    assert check_order([other, edits, freeze]) == [edits, freeze]
    assert check_order([freeze]) == [freeze]  # what it follows is absent: nothing to check


def test_check_order_names_the_callback_that_must_come_first():
    with pytest.raises(ValueError, match="Edits must come before Freeze"):
        check_order([Freeze(), Edits()])


def test_default_hooks_are_no_ops():
    cb = PipelineCallback()
    assert cb.on_before_edits(None, None, []) is None
    assert cb.on_base_model_ready(None, None) is None
    assert cb.on_edits_applied(None, None, None) is None
