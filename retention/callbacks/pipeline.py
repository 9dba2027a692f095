"""The pipeline contract's names where ``retention.callbacks.apply_edits`` imports them; the contract itself is
:mod:`retention.pipeline_contract`."""

from retention.pipeline_contract import PipelineCallback, PipelineState, check_order, pipeline_callbacks

__all__ = ["PipelineCallback", "PipelineState", "check_order", "pipeline_callbacks"]
