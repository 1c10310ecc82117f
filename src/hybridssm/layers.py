"""Shared layers: norms, the feed-forward network, and the fp32 / no-weight-decay parameter mark."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "FFN",
    "mark_fp32_no_decay",
    "is_fp32_no_decay",
    "SinusoidalPositions",
    "LearnedPositions",
    "sinusoidal_encoding",
    "apply_rope",
    "rope_cos_sin",
]

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


# ------------------------------------------------------------------------------------------------
# Positional encodings. Additive ones take each row's start position, so streaming works.
# ------------------------------------------------------------------------------------------------
def _positions(h: Tensor, start: Tensor) -> Tensor:
    """``[B, T]`` int64: ``start[b] + t``."""
    return start.to(torch.long).unsqueeze(1) + torch.arange(h.shape[1], device=h.device)


def sinusoidal_encoding(positions: Tensor, dim: int) -> Tensor:
    """``[..., dim]`` fp32: ``sin(p w_i)`` in the even, ``cos(p w_i)`` in the odd channels, with
    ``w_i = 10000^(-2i/dim)`` (Vaswani et al. 2017, §3.5). Computed from the position, no table."""
    half = (dim + 1) // 2
    freq = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32) * (-2.0 * math.log(10000.0) / dim)
    )
    angle = positions.to(torch.float32).unsqueeze(-1) * freq  # [..., half]
    enc = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)  # interleave sin, cos
    return enc[..., :dim]


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal positions, added: ``pe(h [B, T, d], start [B]) -> h + enc[start + t]``.
    No parameters and no length limit."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, h: Tensor, start: Tensor) -> Tensor:
        return h + sinusoidal_encoding(_positions(h, start), self.dim).to(h.dtype)


class LearnedPositions(nn.Module):
    """Learned absolute positions, added: ``pe(h [B, T, d], start [B]) -> h + table[start + t]``.

    Positions must stay below ``max_positions``; past it, a ``ValueError`` names the option
    (checked in eager mode only; a compiled model is not checked)."""

    def __init__(self, dim: int, max_positions: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        # GPT-2's init for position embeddings (normal, std 0.02)
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, h: Tensor, start: Tensor) -> Tensor:
        pos = _positions(h, start)
        if not torch.compiler.is_compiling():
            last = int(pos.max())
            if last >= self.max_positions:
                raise ValueError(
                    f"learned positions: position {last} is past max_positions={self.max_positions}; "
                    "build the model with a larger max_positions or use positional='rope' or "
                    "'sinusoidal' (no limit)"
                )
        return h + F.embedding(pos, self.weight).to(h.dtype)


def rope_cos_sin(positions: Tensor, dim: int, base: float = 10000.0, dtype=torch.float32):
    """``cos, sin [B, T, 1, dim // 2]`` of RoPE's angles ``p * base^(-2i/dim)`` (computed once and
    shared by q and k)."""
    half = dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=dtype) * 2.0 / dim)
    angle = positions.to(dtype).unsqueeze(-1) * inv_freq  # [B, T, half]
    return angle.cos().unsqueeze(2), angle.sin().unsqueeze(2)


def apply_rope(
    x: Tensor, positions: Tensor, base: float = 10000.0, cos_sin: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Rotary position embedding (Su et al. 2021, RoFormer), "rotate half" pairing
    ``(x_i, x_{i + Dh/2})`` as in GPT-NeoX / LLaMA.

    ``x [B, T, H, Dh]``, ``positions [B, T]`` int -> ``[B, T, H, Dh]``; angles in fp32 (at least).
    With an odd ``Dh`` the last channel is left unrotated. ``cos_sin`` (from :func:`rope_cos_sin`)
    skips recomputing the angles."""
    Dh = x.shape[-1]
    half = Dh // 2
    if half == 0:
        return x
    acc = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(positions, Dh, base, acc)
    xf = x.to(acc)
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)


POSITIONAL = ("none", "sinusoidal", "rope", "learned")


def additive_positions(kind: str, dim: int, max_positions: int) -> nn.Module | None:
    """The model-level encoding for ``positional=kind``: sinusoidal or learned tables are added
    after the input projection; ``"rope"`` lives inside attention and ``"none"`` adds nothing."""
    if kind == "sinusoidal":
        return SinusoidalPositions(dim)
    if kind == "learned":
        return LearnedPositions(dim, max_positions)
    return None
