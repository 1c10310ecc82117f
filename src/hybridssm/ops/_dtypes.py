"""The accumulation dtype, defined once: recurrences accumulate and recurrent states are kept in
the wider of fp32 and the input dtype (fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64)."""

from __future__ import annotations

import torch

__all__ = ["acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The wider of fp32 and ``dtype``."""
    return torch.promote_types(dtype, torch.float32)
