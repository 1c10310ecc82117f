"""Mamba-1 mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

``x [B, T, d] -> y [B, T, d]``, ``E = d_inner = expand_factor * d``, ``N = state_size``::

    x, z   = in_proj(x)                                   # [B, T, E] each (bias: proj_bias)
    u      = silu(conv(x))                                # depthwise causal conv, kernel K, bias
    dt, B, C = x_proj(u)                                  # [B, T, R], [B, T, N], [B, T, N]; R = ceil(d/16)
    delta  = softplus(dt_proj(dt) + dt_bias)              # [B, T, E]
    y      = selective_scan(u, delta, A = -exp(A_log), B, C, D) * silu(z)
    out    = out_proj(y)                                  # (bias: proj_bias)

State ``MambaState(conv [B, E, K-1], ssm [B, E, N] fp32)``. Padded steps (``lengths``) get
``delta = 0``: identity steps of the recurrence. A single step (T = 1) without autograd takes a fused
C++ update (conv + x_proj + dt + state update + gate in one call) when the fused kernels are in use.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.checks import check_bool, check_choice, check_optional_positive, check_positive
from hybridssm.layers import check_dt_range, init_dt_bias, mark_fp32_no_decay
from hybridssm.mixers.base import Mixer, finish_state, state_dtype, valid_mask
from hybridssm.mixers.conv import CausalConv1d
from hybridssm.ops import mamba_step as _step_op
from hybridssm.ops.scan import selective_scan

__all__ = ["MambaMixer", "MambaState", "SelectiveSSM", "DT_INITS"]

DT_INITS = ("random", "constant")


class MambaState(NamedTuple):
    conv: Tensor  # [B, E, K-1] last raw (pre-conv) inputs
    ssm: Tensor  # [B, E, N] SSM state, fp32 (at least)


class SelectiveSSM(nn.Module):
    """The S6 layer: input-dependent ``delta, B, C`` from ``u``, then the selective scan.

    ``forward(u [B, T, E], z [B, T, E] | None, state [B, E, N] | None, *, lengths=None)
    -> (y [B, T, E] in the state dtype, h_T [B, E, N])``.

    Init (Mamba reference): ``A_log[e, n] = log(n + 1)`` (S4D-real), ``D = 1``, ``dt_proj`` weight
    U(+-R^-0.5) (``dt_init="random"``) or the constant R^-0.5 (``"constant"``), ``dt_bias`` =
    inverse softplus of ``dt ~ exp(U(log dt_min, log dt_max))`` (>= ``dt_init_floor``).
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
    ) -> None:
        super().__init__()
        check_dt_range(dt_min, dt_max, dt_init_floor)
        check_choice("dt_init", dt_init, DT_INITS)
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

    def project(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``u [B, T, E]`` -> ``(delta [B, T, E] fp32, B [B, T, N], C [B, T, N])``."""
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
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
    ) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("state_size", state_size),
                        ("expand_factor", expand_factor), ("conv_size", conv_size)):
            check_positive(name, v)
        check_optional_positive("dt_rank", dt_rank)
        check_bool("conv_bias", conv_bias)
        check_bool("proj_bias", proj_bias)
        d, E = hidden_size, expand_factor * hidden_size
        self.hidden_size, self.d_inner, self.state_size, self.conv_size = d, E, state_size, conv_size
        self.proj_bias = proj_bias
        self.in_proj = nn.Linear(d, 2 * E, bias=proj_bias)
        self.conv = CausalConv1d(E, conv_size, bias=conv_bias)
        self.ssm = SelectiveSSM(
            E, state_size=state_size, dt_rank=dt_rank or math.ceil(d / 16), dt_min=dt_min,
            dt_max=dt_max, dt_init_floor=dt_init_floor, dt_init=dt_init,
        )
        self.out_proj = nn.Linear(E, d, bias=proj_bias)
        # -exp(A_log) for the fused step, kept until A_log changes (DerivedCache's key)
        self._neg_A = _step_op.DerivedCache()

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
        # the fused step has no projection biases (the reference's default, proj_bias=False)
        if T == 1 and not self.proj_bias and state.conv.dtype == state.ssm.dtype and _step_op.use_fused_step(
            x, state.ssm.dtype, self.parameters()
        ):
            return self._fused_step(x, state, inplace)
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, E] each
        xc, conv_state = self.conv(xi, state.conv, lengths)
        u = F.silu(xc)
        y, h = self.ssm(u, z, state.ssm, lengths=lengths)  # y [B, T, E] fp32
        new = MambaState(conv=conv_state, ssm=h.to(state.ssm.dtype))
        return self.out_proj(y.to(x.dtype)), finish_state(state, new, inplace)

    def _fused_step(self, x: Tensor, state: MambaState, inplace: bool) -> tuple[Tensor, MambaState]:
        """T = 1 without autograd: one fused call for the whole mixer."""
        # the kernel updates contiguous buffers in place: the caller's own when allowed, else copies
        conv, h = (
            t if inplace and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
            for t in state
        )
        ssm = self.ssm
        # eager: -exp(A_log) from the cache; a compiled graph computes it (no version reads in graphs)
        A = None
        if not torch.compiler.is_compiling():
            A = self._neg_A_cache().get(ssm.A_log, h.dtype, _step_op.neg_exp)
        out = _step_op.mamba_step(
            x[:, 0], self.in_proj.weight, conv, h, self.conv.weight, self.conv.bias, ssm.x_proj.weight,
            ssm.dt_proj.weight, ssm.dt_bias, ssm.A_log, ssm.D, self.out_proj.weight, A=A,
        ).unsqueeze(1)  # [B, 1, d]
        return out, finish_state(state, MambaState(conv, h), inplace)

    def _neg_A_cache(self) -> _step_op.DerivedCache:
        cache = self.__dict__.get("_neg_A")  # absent on a module unpickled from an older version
        return cache if cache is not None else self.__dict__.setdefault("_neg_A", _step_op.DerivedCache())

    # -- one call for a whole stack of Mamba blocks (SequenceModel.step, through ResidualBlock) ------
    def fused_step_weights(self, dtype: torch.dtype) -> tuple | None:
        """``(op, weights)`` for :func:`hybridssm.ops.mamba_step.mamba_stack_step`: this mixer's 9
        weights (in_w, conv_w, conv_b, xproj_w, dt_w, dt_bias, A = -exp(A_log), D, out_w; None for an
        absent bias), read from the modules now; ``A`` comes from a cache keyed on ``A_log``'s
        version and storage (never stale). None when the fused kernel is not the selected backend.
        Eager only (callers skip it under ``torch.compile``)."""
        if self.proj_bias or not _step_op.fused_selected("cpu"):
            return None
        # straight from the parameter dicts: module attribute lookups cost more than the check itself
        try:
            m = self._modules
            ssm = m["ssm"]
            sp, sm = ssm._parameters, ssm._modules
            conv = m["conv"]._parameters
            weights = (
                m["in_proj"]._parameters["weight"], conv["weight"], conv.get("bias"),
                sm["x_proj"]._parameters["weight"], sm["dt_proj"]._parameters["weight"], sp["dt_bias"],
                sp["A_log"], sp["D"], m["out_proj"]._parameters["weight"],
            )
        except KeyError:  # a parametrised or replaced module: the generic path handles it
            return None
        A = self._neg_A_cache().get(weights[6], dtype, _step_op.neg_exp)
        return _step_op.mamba_stack_step, (*weights[:6], A, *weights[7:])
