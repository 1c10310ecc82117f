"""The fused CPU kernels of the Mamba-2 mixer (``csrc/mamba2_fused.cpp``) as ``torch.library`` custom
ops with fake implementations and autograd, so that ``torch.compile(fullgraph=True)`` traces them.

Low level: every op takes float32 / float64 CPU tensors of one dtype; ``x``-like inputs may be strided
views whose last dim is contiguous (a split of the ``in_proj`` output), the rest contiguous. The
user-facing forms, with dtype handling and layouts, are :func:`hybridssm.ops.ssd.ssd_fused`,
:func:`hybridssm.ops.conv_silu.causal_conv1d_silu_fused` and
:func:`hybridssm.ops.gated_norm.gated_rmsnorm_fused`.
"""

from __future__ import annotations

import math

import torch

from hybridssm.ops._cpu_ext import kernel_probe, load_extension
from hybridssm.ops._custom_op import Backward, kernel_op

__all__ = ["ext", "fused_probe", "ssd_fwd", "conv_silu_fwd", "gnorm_fwd", "SSD_CHECKPOINT", "FUSED_DTYPES"]

SSD_CHECKPOINT = 32  # must equal kChunk in csrc/mamba2_fused.cpp
FUSED_DTYPES = (torch.float32, torch.float64)


def ext():
    return load_extension("mamba2_fused")


fused_probe = kernel_probe("mamba2_fused", "Mamba-2 kernels")


def _ssd_grads(saved: tuple, grads: tuple) -> tuple:
    """The kernel leaves A, B, C and D's gradients per batch row and head: sum them (a group's heads
    share B and C)."""
    x, B = saved[0], saved[3]
    dx, ddt, dA, dB, dC, dD, dh0 = grads
    Bsz, T, H, _ = x.shape
    G, N = B.shape[2], B.shape[3]
    dB = dB.view(Bsz, T, G, H // G, N).sum(3)
    dC = dC.view(Bsz, T, G, H // G, N).sum(3)
    return dx, ddt, dA.sum(0), dB, dC, dD.sum(0), dh0


def _ssd_bwd_fake(dy, dhT, x, dt, A, B, C, D, ckpt):
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    e = x.new_empty
    return (e((Bsz, T, H, P)), e((Bsz, T, H)), e((Bsz, H)), e((Bsz, T, H, N)), e((Bsz, T, H, N)),
            e((Bsz, H)), e((Bsz, H, P, N)))


# SSD recurrence: (y [B, T, H, P], h_T [B, H, P, N], checkpoints); see hybridssm.ops.ssd. The backward
# kernel gives (dx, ddt, dA [B, H], dB [B, T, H, N], dC [B, T, H, N], dD [B, H], dh0).
ssd_fwd = kernel_op(
    "mamba2_ssd_fwd", extension="mamba2_fused", kernel="ssd_fwd",
    schema="(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor h0, bool save)"
           " -> (Tensor, Tensor, Tensor)",
    fake=lambda x, dt, A, B, C, D, h0, save: (
        x.new_empty(x.shape), torch.empty_like(h0),
        x.new_empty((x.shape[0], x.shape[2], math.ceil(x.shape[1] / SSD_CHECKPOINT), B.shape[-1], x.shape[3])
                    if save else (0,)),
    ),
    backward=Backward(
        kernel="ssd_bwd",
        schema="(Tensor dy, Tensor dhT, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D,"
               " Tensor ckpt) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        fake=_ssd_bwd_fake,
        save=lambda inputs, outputs: (*inputs[:6], outputs[2]),
        grads=2,
        checkpoint=2,
        finish=_ssd_grads,
    ),
)

# Causal depthwise conv + SiLU: silu(conv(x) + bias) [B, T, C]; wt [K, C], st [B, K-1, C] (time-major).
# The backward recomputes the pre-activation; it gives (dx, dwt, dbias, dst).
conv_silu_fwd = kernel_op(
    "mamba2_conv_silu_fwd", extension="mamba2_fused", kernel="conv_silu_fwd",
    schema="(Tensor x, Tensor wt, Tensor bias, Tensor st) -> Tensor",
    fake=lambda x, wt, bias, st: x.new_empty(x.shape),
    backward=Backward(
        kernel="conv_silu_bwd",
        schema="(Tensor dy, Tensor x, Tensor wt, Tensor bias, Tensor st) -> (Tensor, Tensor, Tensor, Tensor)",
        fake=lambda dy, x, wt, bias, st: tuple(torch.empty_like(t) for t in (dy, wt, bias, st)),
        save=lambda inputs, outputs: inputs,
    ),
)

# Gated RMSNorm: (rmsnorm_groups(y * silu(z)) * w [B, T, E], rstd [B, T, groups]); the backward keeps
# only rstd and gives (dy, dz, dw).
gnorm_fwd = kernel_op(
    "mamba2_gnorm_fwd", extension="mamba2_fused", kernel="gnorm_fwd",
    schema="(Tensor y, Tensor z, Tensor w, int groups, float eps) -> (Tensor, Tensor)",
    fake=lambda y, z, w, groups, eps: (y.new_empty(y.shape), y.new_empty((*y.shape[:2], groups))),
    backward=Backward(
        kernel="gnorm_bwd",
        schema="(Tensor dout, Tensor y, Tensor z, Tensor w, Tensor rstd) -> (Tensor, Tensor, Tensor)",
        fake=lambda dout, y, z, w, rstd: (y.new_empty(y.shape), y.new_empty(y.shape), torch.empty_like(w)),
        save=lambda inputs, outputs: (*inputs[:3], outputs[1]),
    ),
)
