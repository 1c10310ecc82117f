"""Mamba-2 mixer (Dao & Gu, "Transformers are SSMs", ICML 2024): the SSD selective SSM.

Per token (``E = d_inner = expand_factor * hidden``, ``H = E / P`` heads of width ``P``, ``G`` groups
of ``N``-wide B/C, each shared by ``H / G`` consecutive heads)::

    z, xBC, dt = in_proj(x)                      # [E], [E + 2GN], [H]   (no bias)
    xBC        = silu(causal_conv_K(xBC))        # depthwise, with bias, over x, B and C together
    x, B, C    = split(xBC)                      # [H, P], [G, N], [G, N]
    dt         = softplus(dt + dt_bias)          # [H], not clamped (the reference's default limit)
    y          = SSD(x, dt, A = -exp(A_log), B, C) + D x        # ops.ssd, state [H, P, N] in fp32
    out        = out_proj(rmsnorm_G(y * silu(z)))              # norm per group, fp32 (no bias)

The parameterisation and initialisations are the reference's (state-spaces/mamba ``Mamba2``): ``A``
per head with ``A_log = log U(1, 16)``, ``D = 1``, ``dt_bias`` = inverse softplus of
``dt ~ exp(U(log 1e-3, log 1e-1))`` clamped at 1e-4. Padded steps (``lengths``) get ``dt = 0``:
identity steps for the scan.
State: ``conv [B, E + 2GN, K-1]`` (raw pre-conv inputs) and ``ssm [B, H, P, N]`` (fp32 at least).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.checks import (
    check_bool,
    check_optional_positive,
    check_positive,
    check_positive_float,
    largest_divisor_at_most,
)
from hybridssm.layers import check_dt_range, init_dt_bias, mark_fp32_no_decay
from hybridssm.mixers.base import Mixer, finish_state, state_dtype, valid_mask
from hybridssm.ops.conv_silu import causal_conv1d_silu
from hybridssm.ops.gated_norm import gated_rmsnorm
from hybridssm.ops.ssd import DEFAULT_CHUNK_SIZE, ssd
from hybridssm.ops.step import MixerStep

__all__ = [
    "Mamba2Mixer", "Mamba2State", "Mamba2StepWeights", "GatedRMSNorm", "default_ssm_head_dim",
    "check_mamba2_options", "mamba2_heads",
]

MAX_HEAD_DIM = 64  # the reference's head width


def default_ssm_head_dim(d_inner: int) -> int:
    """The largest divisor of ``d_inner`` that is at most 64 (64 whenever 64 divides it), so that
    every width builds."""
    return largest_divisor_at_most(d_inner, MAX_HEAD_DIM)


def check_mamba2_options(
    *, ssm_head_dim: object, num_groups: object, scan_chunk_size: object, A_init_range: object,
    dt_min: object, dt_max: object, dt_init_floor: object, dt_limit: object, D_has_hdim: object,
    norm_before_gate: object, conv_bias: object, proj_bias: object, norm_eps: object,
) -> None:
    """Check the values of the mixer's options that need no width (one rule for the mixer, the
    configs' :class:`~hybridssm.config.Mamba2Options` and ``hybrid(backbone="mamba2")``'s
    ``backbone_options``): ``A_init_range = (lo, hi)`` with ``0 < lo <= hi``; ``dt_limit = (lo,
    hi)`` with ``0 <= lo < hi`` (``hi`` may be inf); positive sizes; booleans; the ``dt`` range."""
    def pair(v: object) -> bool:
        return (isinstance(v, (tuple, list)) and len(v) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))

    if not pair(A_init_range) or not 0 < A_init_range[0] <= A_init_range[1] < math.inf:
        raise ValueError(
            f"option 'A_init_range' must be a pair (lo, hi) with 0 < lo <= hi, got {A_init_range!r}"
        )
    if not pair(dt_limit) or not 0 <= dt_limit[0] < dt_limit[1]:
        raise ValueError(
            f"option 'dt_limit' must be a pair (lo, hi) with 0 <= lo < hi (hi may be inf), "
            f"got {dt_limit!r}"
        )
    check_optional_positive("ssm_head_dim", ssm_head_dim)
    check_positive("num_groups", num_groups)
    check_positive("scan_chunk_size", scan_chunk_size)
    check_dt_range(dt_min, dt_max, dt_init_floor)
    for name, value in (("D_has_hdim", D_has_hdim), ("norm_before_gate", norm_before_gate),
                        ("conv_bias", conv_bias), ("proj_bias", proj_bias)):
        check_bool(name, value)
    check_positive_float("norm_eps", norm_eps)


def mamba2_heads(d_inner: int, ssm_head_dim: int | None, num_groups: int) -> tuple[int, int]:
    """``(H, P)``: the heads and head width of a width ``d_inner``; ``ssm_head_dim`` (None: the
    default) must divide ``d_inner`` and ``num_groups`` must divide ``H``."""
    P = default_ssm_head_dim(d_inner) if ssm_head_dim is None else ssm_head_dim
    if d_inner % P:
        raise ValueError(
            f"option 'ssm_head_dim' must divide d_inner = expand_factor * hidden_size = {d_inner}, "
            f"got {P}"
        )
    H = d_inner // P
    if H % num_groups:
        raise ValueError(
            f"option 'num_groups' must divide the number of heads d_inner / ssm_head_dim = {H}, "
            f"got {num_groups}"
        )
    return H, P


class Mamba2State(NamedTuple):
    conv: Tensor  # [B, E + 2GN, K-1] last raw inputs of the conv over x, B, C
    ssm: Tensor  # [B, H, P, N] SSD state, fp32 at least


class Mamba2StepWeights(NamedTuple):
    """The weights of the fused step (``csrc/step/mamba2.h``), as the parameters themselves."""

    in_w: Tensor  # [E + C + H, d] -> z, xBC, dt
    conv_w: Tensor  # [C, 1, K]
    conv_b: Tensor | None  # [C]
    dt_bias: Tensor  # [H]
    A_log: Tensor  # [H]
    D: Tensor  # [H], or [E] with D_has_hdim
    norm_w: Tensor  # [E]
    out_w: Tensor  # [d, E]
    in_b: Tensor | None = None  # [E + C + H] (proj_bias)
    out_b: Tensor | None = None  # [d] (proj_bias)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z))`` over groups of ``dim // groups`` channels, in fp32 at least
    (``norm_before_gate=False``, the reference's); ``norm_before_gate=True``:
    ``rmsnorm(y) * silu(z)``."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-5, *, norm_before_gate: bool = False) -> None:
        super().__init__()
        self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate
        self.weight = mark_fp32_no_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        if not self.norm_before_gate:
            return gated_rmsnorm(y, z, self.weight, self.groups, self.eps)  # ops.gated_norm
        acc = torch.promote_types(y.dtype, self.weight.dtype)
        g = y.to(acc).unflatten(-1, (self.groups, -1))  # [..., G, E/G]
        g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return g * self.weight.to(acc) * F.silu(z.to(acc))


class Mamba2Mixer(Mixer):
    """Mamba-2 (SSD) as a mixer ``[B, T, d] -> [B, T, d]``.

    Args:
        hidden_size: model width ``d``.
        state_size: ``N``, the SSM state per head channel. Default 16 (the seeds' Mamba; the
            Mamba-2 paper uses 64-256).
        expand_factor: ``d_inner = expand_factor * hidden_size``.
        conv_size: ``K``, width of the depthwise causal conv over x, B, C.
        ssm_head_dim: ``P``, width of each SSD head; must divide ``d_inner``. Default: the largest
            divisor of ``d_inner`` that is at most 64 (the reference's 64 at usual widths).
        num_groups: ``G``, groups of heads sharing B and C; must divide the number of heads.
        scan_chunk_size: chunk length of the chunked SSD scan (a speed knob; values do not depend
            on it beyond fp32 rounding).
        A_init_range: ``A = -exp(A_log)`` starts at ``-U(lo, hi)`` per head ((1, 16)).
        dt_min, dt_max, dt_init_floor: the ``dt_bias`` init (1e-3, 1e-1, 1e-4).
        dt_limit: ``dt`` is clamped to ``[lo, hi]`` after the softplus ((0, inf): no clamp).
        D_has_hdim: ``D`` per channel ``[H * P]`` instead of per head ``[H]`` (False).
        norm_before_gate: ``rmsnorm(y) * silu(z)`` instead of ``rmsnorm(y * silu(z))`` (False).
        conv_bias: a bias in the causal conv (True); proj_bias: in the projections (False).
        norm_eps: epsilon of the gated RMSNorm (1e-5, ``transformers``' ``layer_norm_epsilon``).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        state_size: int = 16,
        expand_factor: int = 2,
        conv_size: int = 4,
        ssm_head_dim: int | None = None,
        num_groups: int = 1,
        scan_chunk_size: int = DEFAULT_CHUNK_SIZE,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        D_has_hdim: bool = False,
        norm_before_gate: bool = False,
        conv_bias: bool = True,
        proj_bias: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("state_size", state_size),
                            ("expand_factor", expand_factor), ("conv_size", conv_size)):
            check_positive(name, value)
        check_mamba2_options(
            ssm_head_dim=ssm_head_dim, num_groups=num_groups, scan_chunk_size=scan_chunk_size,
            A_init_range=A_init_range, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
            dt_limit=dt_limit, D_has_hdim=D_has_hdim, norm_before_gate=norm_before_gate,
            conv_bias=conv_bias, proj_bias=proj_bias, norm_eps=norm_eps,
        )
        E = expand_factor * hidden_size
        H, ssm_head_dim = mamba2_heads(E, ssm_head_dim, num_groups)
        N, G, K = state_size, num_groups, conv_size
        self.d_inner, self.state_size, self.conv_size = E, N, K
        self.num_heads, self.head_dim, self.num_groups = H, ssm_head_dim, G
        self.scan_chunk_size = scan_chunk_size
        self.conv_dim = E + 2 * G * N

        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.in_proj = nn.Linear(hidden_size, E + self.conv_dim + H, bias=proj_bias)  # -> z, xBC, dt
        # Depthwise causal conv; nn.Conv1d for its default init (the reference's), applied through
        # ops.conv with the weight as [C, K].
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, bias=conv_bias)
        # S4D-style scalar decay per head: A = -exp(A_log), A ~ U(A_init_range) (Mamba-2 reference).
        self.A_log = mark_fp32_no_decay(nn.Parameter(torch.empty(H).uniform_(*A_init_range).log()))
        self.D = mark_fp32_no_decay(nn.Parameter(torch.ones(E if D_has_hdim else H)))
        self.dt_bias = mark_fp32_no_decay(nn.Parameter(init_dt_bias(H, dt_min, dt_max, dt_init_floor)))
        self.norm = GatedRMSNorm(E, G, norm_eps, norm_before_gate=norm_before_gate)
        self.out_proj = nn.Linear(E, hidden_size, bias=proj_bias)

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> Mamba2State:
        device, dtype = self._device_dtype(device, dtype)
        H, P, N = self.num_heads, self.head_dim, self.state_size
        return Mamba2State(
            conv=torch.zeros(batch_size, self.conv_dim, self.conv_size - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, H, P, N, device=device, dtype=state_dtype(dtype)),
        )

    def _device_dtype(self, device, dtype):
        # The first parameter (A_log) is kept at fp32; the projections tell the compute dtype.
        p = self.in_proj.weight
        return (torch.device(device) if device is not None else p.device), dtype or p.dtype

    def forward(
        self, x: Tensor, state: Mamba2State | None = None, *, lengths: Tensor | None = None,
        inplace: bool = False,
    ) -> tuple[Tensor, Mamba2State]:
        """``x [B, T, d]`` -> ``(y [B, T, d], state)``; see the module docstring."""
        Bsz, T, _ = x.shape
        E, H, P, G, N = self.d_inner, self.num_heads, self.head_dim, self.num_groups, self.state_size
        fresh = state is None  # the scan can skip reading a zero initial state
        if fresh:
            state = self.init_state(Bsz, device=x.device, dtype=x.dtype)
        # Column slices of one projection, used as views: the fused kernels read them through
        # their strides (ops.conv_silu, ops.ssd, ops.gated_norm), so nothing is copied here.
        z, xBC, dt = self.in_proj(x).split([E, self.conv_dim, H], dim=-1)
        xBC, conv_state = causal_conv1d_silu(
            xBC, self.conv1d.weight[:, 0], self.conv1d.bias, state.conv, lengths
        )
        xs, Bm, Cm = xBC.split([E, G * N, G * N], dim=-1)

        acc = state.ssm.dtype
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # [B, T, H]
        if self.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*self.dt_limit)
        mask = valid_mask(lengths, T, x.device)
        if mask is not None:  # padded steps: dt = 0 leaves the state untouched
            dt = torch.where(mask.unsqueeze(-1), dt, 0.0)
        A = -torch.exp(self.A_log.to(acc))  # [H]
        per_head = self.D.shape[0] == H  # D [H] goes into the scan; D [H * P] is added here
        xh = xs.reshape(Bsz, T, H, P)
        y, ssm_state = ssd(
            xh,
            dt,
            A,
            Bm.reshape(Bsz, T, G, N),
            Cm.reshape(Bsz, T, G, N),
            D=self.D.to(acc) if per_head else None,
            state=None if fresh else state.ssm,
            chunk_size=self.scan_chunk_size,
        )
        if not per_head:
            y = y + xh.to(y.dtype) * self.D.to(y.dtype).view(H, P)
        y = self.norm(y.reshape(Bsz, T, E), z)  # fp32 at least
        new = Mamba2State(conv=conv_state, ssm=ssm_state.to(acc))
        return self.out_proj(y.to(x.dtype)), finish_state(state, new, inplace)

    def step_spec(self) -> MixerStep:
        """This mixer's fused step, for every configuration: kind ``"mamba2"``, ints
        ``(H, P, G, N, norm_before_gate)``, floats ``(norm eps, dt_limit lo, dt_limit hi)``; the
        projections' biases (``proj_bias``) and a per-channel ``D`` (``D_has_hdim``) are weights."""
        w = Mamba2StepWeights(
            self.in_proj.weight, self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D,
            self.norm.weight, self.out_proj.weight, self.in_proj.bias, self.out_proj.bias,
        )
        ints = (self.num_heads, self.head_dim, self.num_groups, self.state_size,
                int(self.norm.norm_before_gate))
        return MixerStep("mamba2", w, ints, (float(self.norm.eps), *self.dt_limit))
