"""Restarting rows of a streaming state in one C++ call (``step(..., reset=done, inplace=True)``).

A batch of streams resets a few rows per step as episodes end. Writing each of a state's tensors
from Python (an ``index_copy_`` per tensor, on an ``init_state`` of the restarted rows) costs tens
of microseconds per tensor, a sizeable part of a step at many streams; :func:`fill_rows` copies one
fresh row (``init_state(1)``) into every restarted row of every tensor in one call instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from hybridssm.ops.step import fused_step_available, step_extension
from hybridssm.state import ModelState

__all__ = ["fill_rows"]


def fill_rows(state: ModelState, fresh: ModelState, done: Tensor) -> bool:
    """Rows of ``state`` where ``done [B]`` (bool) is True take the values of ``fresh``, a state of
    the same structure with batch 1, in place, in one C++ call. Returns False, with nothing
    written, where that call does not apply (the fused kernels are off or did not build, a tensor
    needs its gradient: autograd does not see a C++ copy, tensors off the CPU or not contiguous, or
    not of ``fresh``'s dtype and row shape): the caller then writes the rows itself."""
    if not fused_step_available():
        return False
    leaves = pytree.tree_leaves(state)
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        return False
    return step_extension().fill_rows(leaves, pytree.tree_leaves(fresh), done) >= 0
