"""Mamba-1 mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

``x [B, T, d] -> y [B, T, d]``, ``E = d_inner = expand_factor * d``, ``N = state_size``::

    x, z   = in_proj(x)                                   # [B, T, E] each (bias: proj_bias)
    u      = silu(conv(x))                                # depthwise causal conv, kernel K, bias
    dt, B, C = x_proj(u)                                  # [B, T, R], [B, T, N], [B, T, N]; R = ceil(d/16)
    dt, B, C = rms(dt), rms(B), rms(C)                    # only with inner_norms (Jamba)
    delta  = softplus(dt_proj(dt) + dt_bias)              # [B, T, E]
    y      = selective_scan(u, delta, A = -exp(A_log), B, C, D) * silu(z)
    out    = out_proj(y)                                  # (bias: proj_bias)

State ``MambaState(conv [B, E, K-1], ssm [B, E, N] fp32)``. Padded steps (``lengths``) get
``delta = 0``: identity steps of the recurrence. A single step (T = 1) without autograd takes the
fused C++ step (:meth:`MambaMixer.step_spec`, ``ops/csrc/step/mamba.h``: projections, conv, state
update and gate in one call, the inner norms included) when the fused kernels are in use, in
eager mode.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.checks import (
    check_bool,
    check_choice,
    check_optional_positive,
    check_positive,
    check_positive_float,
)
from hybridssm.layers import RMSNorm, check_dt_range, init_dt_bias, mark_fp32_no_decay
from hybridssm.mixers.base import Mixer, finish_state, state_dtype, valid_mask
from hybridssm.mixers.conv import CausalConv1d
from hybridssm.ops.scan import selective_scan
from hybridssm.ops.step import MixerStep, fused_step_available, mixer_step

__all__ = ["MambaMixer", "MambaState", "MambaStepWeights", "SelectiveSSM", "DT_INITS"]

DT_INITS = ("random", "constant")


class MambaState(NamedTuple):
    conv: Tensor  # [B, E, K-1] last raw (pre-conv) inputs
    ssm: Tensor  # [B, E, N] SSM state, fp32 (at least)


class MambaStepWeights(NamedTuple):
    """The weights of the fused step (``csrc/step/mamba.h``), as the parameters themselves."""

    in_w: Tensor  # [2E, d]
    conv_w: Tensor  # [E, K]
    conv_b: Tensor | None  # [E]
    xproj_w: Tensor  # [R + 2N, E]
    dt_w: Tensor  # [E, R]
    dt_bias: Tensor  # [E]
    A_log: Tensor  # [E, N]
    D: Tensor  # [E]
    out_w: Tensor  # [d, E]
    dt_norm_w: Tensor | None  # [R]: the inner norms' gains (inner_norms), else None
    b_norm_w: Tensor | None  # [N]
    c_norm_w: Tensor | None  # [N]
    in_b: Tensor | None  # [2E]: the projections' biases (proj_bias), else None
    out_b: Tensor | None  # [d]


class SelectiveSSM(nn.Module):
    """The S6 layer: input-dependent ``delta, B, C`` from ``u``, then the selective scan.

    ``forward(u [B, T, E], z [B, T, E] | None, state [B, E, N] | None, *, lengths=None)
    -> (y [B, T, E] in the state dtype, h_T [B, E, N])``.

    Init (Mamba reference): ``A_log[e, n] = log(n + 1)`` (S4D-real), ``D = 1``, ``dt_proj`` weight
    U(+-R^-0.5) (``dt_init="random"``) or the constant R^-0.5 (``"constant"``), ``dt_bias`` =
    inverse softplus of ``dt ~ exp(U(log dt_min, log dt_max))`` (>= ``dt_init_floor``).

    ``inner_norms=True`` RMS-normalises ``dt`` (over R), ``B`` and ``C`` (over N) right after
    ``x_proj``, each with its own learnable gain (initialised to 1) and epsilon
    ``inner_norm_eps``: Jamba's ``dt_layernorm``, ``b_layernorm``, ``c_layernorm`` (Lieber et al.
    2024, added there to stabilise training at scale).
    """

    def __init__(
        self,
        d_inner: int,
        *,
        state_size: int = 16,
        dt_rank: int,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_init: str = "random",
        inner_norms: bool = False,
        inner_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_dt_range(dt_min, dt_max, dt_init_floor)
        check_choice("dt_init", dt_init, DT_INITS)
        check_bool("inner_norms", inner_norms)
        check_positive_float("inner_norm_eps", inner_norm_eps)
        E, N, R = d_inner, state_size, dt_rank
        self.d_inner, self.state_size, self.dt_rank = E, N, R
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=False)
        if dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        else:
            nn.init.constant_(self.dt_proj.weight, R**-0.5)
        self.dt_bias = mark_fp32_no_decay(nn.Parameter(init_dt_bias(E, dt_min, dt_max, dt_init_floor)))
        # S4D-real: A = -(1, 2, ..., N) for every channel, stored as its log.
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
        self.A_log = mark_fp32_no_decay(nn.Parameter(torch.log(A)))
        self.D = mark_fp32_no_decay(nn.Parameter(torch.ones(E)))
        # Identity when off: one code path, and no parameters (nor state_dict keys) that do nothing
        self.inner_norms = inner_norms
        self.dt_norm, self.b_norm, self.c_norm = (
            RMSNorm(dim, eps=inner_norm_eps) if inner_norms else nn.Identity() for dim in (R, N, N)
        )

    def project(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``u [B, T, E]`` -> ``(delta [B, T, E] fp32, B [B, T, N], C [B, T, N])``."""
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt, Bm, Cm = self.dt_norm(dt), self.b_norm(Bm), self.c_norm(Cm)
        acc = state_dtype(self.A_log.dtype)
        delta = F.softplus(self.dt_proj(dt).to(acc) + self.dt_bias.to(acc))
        return delta, Bm, Cm

    def forward(
        self, u: Tensor, z: Tensor | None = None, state: Tensor | None = None, *, lengths=None
    ) -> tuple[Tensor, Tensor]:
        delta, Bm, Cm = self.project(u)
        mask = valid_mask(lengths, u.shape[1], u.device)
        if mask is not None:  # identity steps on the padding: exp(0 * A) = 1, input 0
            delta = delta * mask.unsqueeze(-1).to(delta.dtype)
        A = -torch.exp(self.A_log.to(delta.dtype))
        return selective_scan(u, delta, A, Bm, Cm, self.D, z, state=state)


class MambaMixer(Mixer):
    """Mamba-1 mixer ``[B, T, d] -> [B, T, d]`` (see the module docstring).

    Args:
        hidden_size: d.
        state_size: N (16).
        expand_factor: E = expand_factor * d (2).
        conv_size: K, the causal conv width (4).
        dt_rank: R, the rank of the delta projection (None: ``ceil(d / 16)``, the reference's
            ``"auto"``).
        dt_min, dt_max, dt_init_floor, dt_init: the delta init (:class:`SelectiveSSM`; the
            reference's 1e-3, 1e-1, 1e-4, ``"random"``).
        conv_bias: a bias in the causal conv (True, as ``use_conv_bias``).
        proj_bias: biases in the input and output projections (False, as ``use_bias``).
        inner_norms: RMSNorms on ``dt``, ``B`` and ``C`` (False; Jamba's ``dt_layernorm``,
            ``b_layernorm``, ``c_layernorm``), with epsilon ``inner_norm_eps`` (1e-6, Jamba's
            ``rms_norm_eps``; only with ``inner_norms=True``).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        state_size: int = 16,
        expand_factor: int = 2,
        conv_size: int = 4,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_init: str = "random",
        conv_bias: bool = True,
        proj_bias: bool = False,
        inner_norms: bool = False,
        inner_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("state_size", state_size),
                        ("expand_factor", expand_factor), ("conv_size", conv_size)):
            check_positive(name, v)
        check_optional_positive("dt_rank", dt_rank)
        check_bool("conv_bias", conv_bias)
        check_bool("proj_bias", proj_bias)
        check_bool("inner_norms", inner_norms)
        if inner_norm_eps != 1e-6 and not inner_norms:
            raise ValueError(
                f"option 'inner_norm_eps'={inner_norm_eps!r} changes nothing with inner_norms=False; "
                "it is allowed only with inner_norms=True"
            )
        d, E = hidden_size, expand_factor * hidden_size
        self.hidden_size, self.d_inner, self.state_size, self.conv_size = d, E, state_size, conv_size
        self.proj_bias = proj_bias
        self.in_proj = nn.Linear(d, 2 * E, bias=proj_bias)
        self.conv = CausalConv1d(E, conv_size, bias=conv_bias)
        self.ssm = SelectiveSSM(
            E, state_size=state_size, dt_rank=dt_rank or math.ceil(d / 16), dt_min=dt_min,
            dt_max=dt_max, dt_init_floor=dt_init_floor, dt_init=dt_init, inner_norms=inner_norms,
            inner_norm_eps=inner_norm_eps,
        )
        self.out_proj = nn.Linear(E, d, bias=proj_bias)

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> MambaState:
        device, dtype = self._device_dtype(device, dtype)
        E, N = self.d_inner, self.state_size
        return MambaState(
            conv=self.conv.init_state(batch_size, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, E, N, device=device, dtype=state_dtype(dtype)),
        )

    def forward(
        self, x: Tensor, state: MambaState | None = None, *, lengths: Tensor | None = None, inplace=False
    ) -> tuple[Tensor, MambaState]:
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, device=x.device, dtype=x.dtype)
        if T == 1 and self._fused_step_applies(x, state):
            return self._fused_step(x, state, inplace)
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, E] each
        xc, conv_state = self.conv(xi, state.conv, lengths)
        u = F.silu(xc)
        y, h = self.ssm(u, z, state.ssm, lengths=lengths)  # y [B, T, E] fp32
        new = MambaState(conv=conv_state, ssm=h.to(state.ssm.dtype))
        return self.out_proj(y.to(x.dtype)), finish_state(state, new, inplace)

    # -- the fused step (one C++ call: ops/csrc/step/mamba.h) -------------------------------------
    def step_spec(self) -> MixerStep:
        """This mixer's fused step: kind ``"mamba"`` with :class:`MambaStepWeights` (the parameters
        themselves; ``-exp(A_log)`` is computed by the kernel on every call; floats: the inner norms'
        eps; with ``proj_bias``, the projections' biases)."""
        ssm = self.ssm
        norms = (ssm.dt_norm, ssm.b_norm, ssm.c_norm)
        eps = ssm.dt_norm.eps if ssm.inner_norms else 0.0
        return MixerStep("mamba", MambaStepWeights(
            self.in_proj.weight, self.conv.weight, self.conv.bias, ssm.x_proj.weight, ssm.dt_proj.weight,
            ssm.dt_bias, ssm.A_log, ssm.D, self.out_proj.weight,
            *(n.weight if ssm.inner_norms else None for n in norms),
            self.in_proj.bias, self.out_proj.bias,
        ), floats=(float(eps),))

    def _fused_step_applies(self, x: Tensor, state: MambaState) -> bool:
        """A T = 1 call in eager mode, on CPU, with no gradient needed, in one fp32/fp64 dtype for the
        input, the states and the parameters (no autocast), with the fused backend selected."""
        if torch.compiler.is_compiling() or x.device.type != "cpu" or not fused_step_available():
            return False
        dt = x.dtype
        if dt not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
            return False
        if state.conv.dtype != dt or state.ssm.dtype != dt:
            return False
        params = list(self.parameters())
        if any(p.dtype != dt for p in params):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)))

    def _fused_step(self, x: Tensor, state: MambaState, inplace: bool) -> tuple[Tensor, MambaState]:
        # the kernel updates contiguous buffers in place: the caller's own when allowed, else copies
        conv, h = (
            t if inplace and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
            for t in state
        )
        pos = torch.zeros(x.shape[0], dtype=torch.long)  # the kernel does not read positions
        out = mixer_step(self.step_spec(), x[:, 0], (conv, h), pos).unsqueeze(1)  # [B, 1, d]
        return out, finish_state(state, MambaState(conv, h), inplace)
