"""The streaming step's fast path: a model's whole ``step`` as one C++ call (:class:`StepPlan`)."""

from hybridssm.ops.step import fused_step_available
from hybridssm.streaming.plan import StepPlan, forget, fused_step, plan_status, prefill_blocks
from hybridssm.streaming.reset import fill_rows

__all__ = ["StepPlan", "fill_rows", "forget", "fused_step", "fused_step_available", "plan_status",
           "prefill_blocks"]
