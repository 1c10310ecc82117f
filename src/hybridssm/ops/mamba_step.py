"""One Mamba-1 mixer step (T = 1), fused: the streaming fast path.

Layout: ``x [B, d]``, ``in_w [2E, d]``, ``conv_state [B, E, K-1]`` and ``ssm_state [B, E, N]`` (both
updated in place), ``conv_w [E, K]``, ``conv_b [E]`` or None, ``xproj_w [R + 2N, E]``, ``dt_w [E, R]``,
``dt_bias, D [E]``, ``A_log [E, N]``, ``out_w [d, E]``. Returns ``out_proj((C . h + D u) * silu(z))``
``[B, d]``: the same values as the full forward at T = 1 (:mod:`hybridssm.mixers.mamba`).

At batch 1 a step is a few microseconds of arithmetic, so dispatch decides its latency: the eager
chain is ~20 small ops per layer, the fused form one call (the projections through ATen from C++,
the conv, x/dt projections, state update and gate in one loop). Backends: ``ref`` / ``torch`` are the
eager chain; ``fused`` the C++ kernel (no autograd: the mixer takes it only when no gradient is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops.scan import _ext, _fused_probe

__all__ = ["mamba_step", "mamba_step_ref", "use_fused_step"]


def mamba_step_ref(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor,
) -> Tensor:
    """Reference: the same step as a chain of PyTorch ops (updates the states in place)."""
    R, N = dt_w.shape[1], A_log.shape[1]
    xi, z = F.linear(x, in_w).chunk(2, dim=-1)  # [B, E] each
    window = torch.cat([conv_state, xi.unsqueeze(-1)], dim=-1)  # [B, E, K]
    xc = (window * conv_w).sum(-1) + (conv_b if conv_b is not None else 0)
    conv_state.copy_(window[:, :, 1:])
    u = F.silu(xc)
    dt, Bn, Cn = F.linear(u, xproj_w).split([R, N, N], dim=-1)
    delta = F.softplus(F.linear(dt, dt_w) + dt_bias)  # [B, E]
    A = -torch.exp(A_log)
    h = torch.exp(delta.unsqueeze(-1) * A) * ssm_state + (delta * u).unsqueeze(-1) * Bn.unsqueeze(1)
    ssm_state.copy_(h)
    y = (h * Cn.unsqueeze(1)).sum(-1) + D * u
    return F.linear(y * F.silu(z), out_w)


@torch.library.custom_op("hybridssm::mamba_mixer_step", mutates_args=("conv_state", "ssm_state"))
def _mamba_step_op(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor,
) -> Tensor:
    return _ext().mamba_mixer_step(
        x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A_log, D, out_w
    )


@_mamba_step_op.register_fake
def _mamba_step_fake(x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A_log, D, out_w):
    return x.new_empty((x.shape[0], out_w.shape[0]), dtype=ssm_state.dtype)


def mamba_step_fused(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor,
) -> Tensor:
    """The C++ kernel: computes in ``ssm_state``'s dtype; the states must be contiguous."""
    args = (x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A_log, D, out_w)
    if torch.compiler.is_compiling():
        return _mamba_step_op(*args)
    # Eager: call the kernel directly. The Python custom-op dispatch (autograd and functionalisation
    # wrappers) costs more than the kernel itself at batch 1; compiled graphs go through the op.
    return _ext().mamba_mixer_step(*args)


_kernels.register(
    "mamba_step",
    ref=mamba_step_ref,
    torch_impl=mamba_step_ref,
    fused=mamba_step_fused,
    fused_probe=_fused_probe,
)


def use_fused_step(x: Tensor, state_dtype: torch.dtype, params) -> bool:
    """Whether a T = 1 call may take the fused step: the fused backend is selected, no autograd is
    needed, and the states are fp32/fp64 in the parameters' dtype (no autocast)."""
    if _kernels.resolve("mamba_step", x.device.type)[0] != "fused":
        return False
    if state_dtype not in (torch.float32, torch.float64) or x.dtype != state_dtype:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return True


def mamba_step(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor,
) -> Tensor:
    """One mixer step; see the module docstring (the states are updated in place)."""
    impl = _kernels.get("mamba_step", x.device)
    return impl(x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A_log, D, out_w)
