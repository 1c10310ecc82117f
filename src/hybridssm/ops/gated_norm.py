"""Gated RMSNorm of Mamba-2 (Dao & Gu 2024, §7; the reference's ``RMSNormGated`` with the gate applied
before the norm): ``out = rmsnorm_G(y * silu(z)) * weight``, the mean square taken over each of
``groups`` equal groups of channels, in the wider of fp32 and the inputs' dtypes.

Layout: ``y, z [..., E]``, ``weight [E]``; returns ``[..., E]`` in ``promote(y.dtype, weight.dtype)``.

Backends (``hybridssm.ops._kernels``, op name ``gated_rmsnorm``): ``ref`` / ``torch`` (the same
element-wise PyTorch chain; autograd keeps six ``[..., E]`` intermediates) and ``fused`` (CPU,
float32 / float64, 3-D inputs): one C++ pass each way, keeping only ``1 / rms`` per group for the
backward; ``z`` may be a column slice of a larger tensor (no copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._checks import ShapeCheck
from hybridssm.ops.mamba2_fused import FUSED_DTYPES, fused_probe, gnorm_fwd

__all__ = ["gated_rmsnorm", "gated_rmsnorm_ref", "gated_rmsnorm_fused"]


def gated_rmsnorm_ref(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
    """Reference (also the ``torch`` form): the element-wise chain."""
    acc = torch.promote_types(y.dtype, weight.dtype)
    g = y.to(acc) * F.silu(z.to(acc))  # [..., E]
    g = g.unflatten(-1, (groups, -1))  # [..., G, E/G]
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return g.flatten(-2) * weight.to(acc)


def gated_rmsnorm_fused(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
    """Fused CPU kernel; inputs that are not 3-D or not float32 / float64 take the reference form."""
    acc = torch.promote_types(y.dtype, weight.dtype)
    if acc not in FUSED_DTYPES or y.dim() != 3:
        return gated_rmsnorm_ref(y, z, weight, groups, eps)
    y = y.to(acc).contiguous()
    z = z.to(acc)
    if z.stride(-1) != 1 and z.shape[-1] > 1:
        z = z.contiguous()
    out, _ = gnorm_fwd(y, z, weight.to(acc).contiguous(), groups, float(eps))
    return out


_kernels.register(
    "gated_rmsnorm",
    ref=gated_rmsnorm_ref,
    torch_impl=gated_rmsnorm_ref,
    fused=gated_rmsnorm_fused,
    fused_probe=fused_probe,
)


def gated_rmsnorm(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """``rmsnorm_groups(y * silu(z)) * weight``; see the module docstring. A wrong shape or a
    ``groups`` that does not divide ``E`` raises ``ValueError``."""
    check = ShapeCheck("gated_rmsnorm")
    dims = "abcdefgh"[: y.dim() - 1] + "E"  # [..., E]
    for name, t, d in (("y", y, dims), ("z", z, dims), ("weight", weight, "E")):
        check(name, t, d)
    E = check.sizes["E"]
    check.require(isinstance(groups, int) and groups >= 1 and E % groups == 0,
                  f"groups must be a positive divisor of E = {E}, got {groups!r}")
    return _kernels.get("gated_rmsnorm", y.device)(y, z, weight, groups, eps)
