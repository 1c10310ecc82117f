"""Shared layers: norms, the feed-forward network, and the fp32 / no-weight-decay parameter mark."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.checks import check_positive_float
from hybridssm.ops._dtypes import acc_dtype

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "FFN",
    "mark_fp32_no_decay",
    "is_fp32_no_decay",
    "SinusoidalPositions",
    "LearnedPositions",
    "sinusoidal_encoding",
    "seed_sinusoidal_encoding",
    "make_norm",
    "inverse_softplus",
    "init_dt_bias",
    "check_dt_range",
    "NORMS",
    "FFN_ACTIVATIONS",
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


def inverse_softplus(x: Tensor) -> Tensor:
    """``softplus^-1(x) = x + log(-expm1(-x))`` for ``x > 0``: a bias whose softplus is ``x``."""
    return x + torch.log(-torch.expm1(-x))


def init_dt_bias(
    n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4
) -> Tensor:
    """Mamba's ``dt_bias`` init (Gu & Dao 2023, §3.6; ``mamba_ssm``): ``dt ~ exp(U(log dt_min,
    log dt_max))`` clamped at ``dt_init_floor``, stored as its inverse softplus, so that
    ``softplus(0 + dt_bias)`` starts at a spread of time scales. ``[n]`` fp32."""
    log_dt = torch.empty(n).uniform_(math.log(dt_min), math.log(dt_max))
    return inverse_softplus(torch.exp(log_dt).clamp(min=dt_init_floor))


def check_dt_range(dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """The options of :func:`init_dt_bias`: ``0 < dt_min <= dt_max`` and ``dt_init_floor > 0``."""
    for name, v in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor)):
        check_positive_float(name, v)
    if dt_min > dt_max:
        raise ValueError(f"options 'dt_min'={dt_min!r} and 'dt_max'={dt_max!r}: need dt_min <= dt_max")


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


FFN_ACTIVATIONS = ("gelu", "swiglu", "geglu")


class FFN(nn.Module):
    """Position-wise feed-forward network of hidden width ``mult * dim`` (or ``inner``).

    ``activation="gelu"``: ``down(gelu(up(x)))`` (the seeds' attention layers, Vaswani et al.).
    ``"swiglu"``: ``down(silu(gate(x)) * up(x))`` (Shazeer 2020; LLaMA, Jamba's MLP).
    ``"geglu"``: ``down(gelu_tanh(gate(x)) * up(x))``, Griffin's gated MLP (De et al. 2024; the
    tanh-approximate GELU as recurrentgemma). ``bias``: biases on every projection. ``inner``:
    the hidden width when it is not a multiple of ``dim`` (``transformers``' ``intermediate_size``).
    """

    def __init__(
        self, dim: int, mult: int = 4, dropout: float = 0.0, *, activation: str = "gelu",
        bias: bool = True, inner: int | None = None,
    ) -> None:
        super().__init__()
        if activation not in FFN_ACTIVATIONS:
            raise ValueError(
                f"option 'ffn_activation' must be one of {', '.join(map(repr, FFN_ACTIVATIONS))}; "
                f"got {activation!r}"
            )
        inner = mult * dim if inner is None else inner
        self.activation = activation
        self.up = nn.Linear(dim, inner, bias=bias)
        self.gate = nn.Linear(dim, inner, bias=bias) if activation != "gelu" else None
        self.down = nn.Linear(inner, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            h = F.gelu(self.up(x))
        elif self.activation == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.gate(x), approximate="tanh") * self.up(x)
        return self.down(self.dropout(h))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, eps: float | None = None) -> nn.Module:
    """``"layernorm"`` (eps 1e-5 by default) or ``"rmsnorm"`` (eps 1e-6 by default; ``transformers``'
    Mamba uses 1e-5 through ``layer_norm_epsilon``)."""
    if kind == "layernorm":
        return LayerNorm(dim) if eps is None else LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim) if eps is None else RMSNorm(dim, eps=eps)
    raise ValueError(f"option 'norm' must be one of {', '.join(map(repr, NORMS))}; got {kind!r}")


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


SEED_SINUSOID_SCALE = 0.01


def seed_sinusoidal_encoding(positions: Tensor, dim: int) -> Tensor:
    """``[..., dim]`` (fp32 at least): the seeds' ``add_positional_encoding``, used by their
    ``Hybrid.build``: ``pe[t, j] = sin(t / (1 + 0.01 j))`` for channel ``j`` (sine only, one
    frequency per channel, positions from 0). Not the textbook encoding (:func:`sinusoidal_encoding`)."""
    acc = torch.float32
    if positions.is_floating_point():
        acc = torch.promote_types(positions.dtype, acc)
    j = torch.arange(dim, device=positions.device, dtype=acc)
    freq = 1.0 / (1.0 + j * SEED_SINUSOID_SCALE)
    return torch.sin(positions.to(acc).unsqueeze(-1) * freq)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal positions, added: ``pe(h [B, T, d], start [B]) -> h + enc[start + t]``.
    No parameters and no length limit. ``seed=True``: the seeds' encoding
    (:func:`seed_sinusoidal_encoding`), else the textbook one (:func:`sinusoidal_encoding`)."""

    def __init__(self, dim: int, *, seed: bool = False) -> None:
        super().__init__()
        self.dim, self.seed = dim, seed

    def forward(self, h: Tensor, start: Tensor) -> Tensor:
        encode = seed_sinusoidal_encoding if self.seed else sinusoidal_encoding
        return h + encode(_positions(h, start), self.dim).to(h.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, seed={self.seed}"


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
    acc = acc_dtype(x.dtype)
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(positions, Dh, base, acc)
    xf = x.to(acc)
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)


POSITIONAL = ("none", "sinusoidal", "seed_sinusoidal", "rope", "learned")


def additive_positions(kind: str, dim: int, max_positions: int) -> nn.Module | None:
    """The model-level encoding for ``positional=kind``: sinusoidal or learned tables are added
    after the input projection; ``"rope"`` lives inside attention and ``"none"`` adds nothing."""
    if kind in ("sinusoidal", "seed_sinusoidal"):
        return SinusoidalPositions(dim, seed=kind == "seed_sinusoidal")
    if kind == "learned":
        return LearnedPositions(dim, max_positions)
    return None
