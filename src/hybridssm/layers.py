"""Shared layers: norms, the feed-forward network, and the fp32 / no-weight-decay parameter mark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerNorm", "RMSNorm", "FFN", "mark_fp32_no_decay", "is_fp32_no_decay"]

_MARK = "_hybridssm_fp32_no_decay"


def mark_fp32_no_decay(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter (SSM ``A_log``, ``D``, ``dt_bias``, decays, norm gains) that stays at
    least fp32 under dtype casts and gets no weight decay. Returns the parameter."""
    setattr(param, _MARK, True)
    return param


def is_fp32_no_decay(param: Tensor) -> bool:
    """Whether :func:`mark_fp32_no_decay` marked ``param``."""
    return getattr(param, _MARK, False)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (at least), returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = mark_fp32_no_decay(nn.Parameter(torch.ones(dim)))
        self.bias = mark_fp32_no_decay(nn.Parameter(torch.zeros(dim))) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, self.weight.dtype)
        b = self.bias.to(acc) if self.bias is not None else None
        y = F.layer_norm(x.to(acc), x.shape[-1:], self.weight.to(acc), b, self.eps)
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (at least), returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = mark_fp32_no_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, x: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, self.weight.dtype)
        xf = x.to(acc)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(acc)).to(x.dtype)


class FFN(nn.Module):
    """Position-wise feed-forward network: Linear(d, mult*d) -> GELU -> Linear(mult*d, d)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(dim, mult * dim)
        self.down = nn.Linear(mult * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))
