"""One Mamba-1 step between the two projections, fused (the streaming fast path).

Layout: ``xz [B, 2E]`` (``in_proj`` output: x then z), ``conv_state [B, E, K-1]``,
``ssm_state [B, E, N]`` (both updated in place), ``conv_w [E, K]``, ``conv_b [E]`` or None,
``xproj_w [R + 2N, E]``, ``dt_w [E, R]``, ``dt_bias, D [E]``, ``A [E, N]`` (= ``-exp(A_log)``).
Returns ``y [B, E] = (C . h + D u) * silu(z)``, the input of ``out_proj``; the same values as the
full forward at T = 1 (:mod:`hybridssm.mixers.mamba`).

An eager chain of ~15 small ops costs ~200 us per layer at batch 1 in dispatch overhead alone; one
C++ call does the conv, the x/dt projections, the state update and the gate in a few microseconds.
Backends: ``ref`` / ``torch`` are that eager chain; ``fused`` the C++ kernel (no autograd: the
mixer takes this path only when no gradient is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops.scan import _ext, _fused_probe

__all__ = ["mamba_step", "mamba_step_ref", "use_fused_step"]


def mamba_step_ref(
    xz: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor,
) -> Tensor:
    """Reference: the same step as a chain of PyTorch ops (updates the states in place)."""
    E, K = conv_w.shape
    R, N = dt_w.shape[1], A.shape[1]
    x, z = xz.chunk(2, dim=-1)  # [B, E] each
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # [B, E, K]
    xc = (window * conv_w).sum(-1) + (conv_b if conv_b is not None else 0)
    conv_state.copy_(window[:, :, 1:])
    u = F.silu(xc)
    dt, Bn, Cn = F.linear(u, xproj_w).split([R, N, N], dim=-1)
    delta = F.softplus(F.linear(dt, dt_w) + dt_bias)  # [B, E]
    h = torch.exp(delta.unsqueeze(-1) * A) * ssm_state + (delta * u).unsqueeze(-1) * Bn.unsqueeze(1)
    ssm_state.copy_(h)
    y = (h * Cn.unsqueeze(1)).sum(-1) + D * u
    return y * F.silu(z)


@torch.library.custom_op("hybridssm::mamba_step", mutates_args=("conv_state", "ssm_state"))
def _mamba_step_fused(
    xz: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor,
) -> Tensor:
    return _ext().mamba_step(xz, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A, D)


@_mamba_step_fused.register_fake
def _mamba_step_fake(xz, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A, D):
    return xz.new_empty((xz.shape[0], xz.shape[1] // 2))


def mamba_step_fused(
    xz: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor,
) -> Tensor:
    """The C++ kernel; every tensor in ``ssm_state``'s dtype, the states contiguous."""
    dt = ssm_state.dtype
    b = conv_b if conv_b is not None else conv_w.new_empty(0)
    w = [t.to(dt).contiguous() for t in (xz, conv_w, b, xproj_w, dt_w, dt_bias, A, D)]
    return _mamba_step_fused(w[0], conv_state, ssm_state, *w[1:])


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
    xz: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor,
) -> Tensor:
    """One step; see the module docstring (the states are updated in place)."""
    impl = _kernels.get("mamba_step", xz.device)
    return impl(xz, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A, D)
