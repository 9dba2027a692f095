"""The pipeline's contract: hooks dispatched by type, the callbacks' order checked."""

from __future__ import annotations

import subprocess
import sys

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor

from retention.pipeline_contract import PipelineCallback, check_order, pipeline_callbacks


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


def test_pipeline_callbacks_keeps_their_order_without_checking_it():
    edits, freeze, other = Edits(), Freeze(), LearningRateMonitor()
    assert pipeline_callbacks([freeze, other, edits]) == [freeze, edits]


def test_the_module_and_the_callbacks_import_the_contract_from_below_both():
    """The contract imports nothing of the package; modules.finetune reads it without importing retention.callbacks
    (a floor it is not below)."""
    code = ("import sys, retention.pipeline_contract; "
            "print(sorted(m for m in sys.modules if m.startswith('retention.'))); "
            "import retention.modules.finetune as f, retention.pipeline_contract as c; "
            "assert f.PipelineState is c.PipelineState; "
            "print(sorted(m for m in sys.modules if m.startswith('retention.callbacks')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["['retention.pipeline_contract']", "[]"]
    from retention.callbacks import PipelineCallback as exported

    assert exported is PipelineCallback
