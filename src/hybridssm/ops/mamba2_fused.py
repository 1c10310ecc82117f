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
from torch import Tensor

from hybridssm.ops._cpu_ext import kernel_probe, load_extension

__all__ = ["ext", "fused_probe", "SSD_CHECKPOINT", "FUSED_DTYPES"]

SSD_CHECKPOINT = 32  # must equal kChunk in csrc/mamba2_fused.cpp
FUSED_DTYPES = (torch.float32, torch.float64)


def ext():
    return load_extension("mamba2_fused")


fused_probe = kernel_probe("mamba2_fused", "Mamba-2 kernels")


# -- SSD recurrence --------------------------------------------------------------------------------


@torch.library.custom_op("hybridssm::mamba2_ssd_fwd", mutates_args=())
def _ssd_fwd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor, save: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y [B, T, H, P], h_T [B, H, P, N], checkpoints)``; see :mod:`hybridssm.ops.ssd`."""
    y, hT, ckpt = ext().ssd_fwd(x, dt, A, B, C, D, h0, save)
    return y, hT, ckpt


@_ssd_fwd.register_fake
def _ssd_fwd_fake(x, dt, A, B, C, D, h0, save):
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    nck = math.ceil(T / SSD_CHECKPOINT)
    ckpt = x.new_empty((Bsz, H, nck, N, P) if save else (0,))
    return x.new_empty((Bsz, T, H, P)), torch.empty_like(h0), ckpt


@torch.library.custom_op("hybridssm::mamba2_ssd_bwd", mutates_args=())
def _ssd_bwd(
    dy: Tensor, dhT: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
    ckpt: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, ddt, dA [B, H], dB [B, T, H, N], dC [B, T, H, N], dD [B, H], dh0)``: the A, B, C, D
    gradients per batch row / head, summed by the caller."""
    return tuple(ext().ssd_bwd(dy, dhT, x, dt, A, B, C, D, ckpt))


@_ssd_bwd.register_fake
def _ssd_bwd_fake(dy, dhT, x, dt, A, B, C, D, ckpt):
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    e = x.new_empty
    return (e((Bsz, T, H, P)), e((Bsz, T, H)), e((Bsz, H)), e((Bsz, T, H, N)), e((Bsz, T, H, N)),
            e((Bsz, H)), e((Bsz, H, P, N)))


def _ssd_setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, D, h0, save = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, output[2])


def _ssd_backward(ctx, dy, dhT, _dckpt):
    x, dt, A, B, C, D, ckpt = ctx.saved_tensors
    if ckpt.numel() == 0:
        raise RuntimeError("mamba2_ssd_fwd ran with save=False; it cannot be differentiated")
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dy = x.new_zeros(Bsz, T, H, P) if dy is None else dy.contiguous()
    dhT = x.new_zeros(Bsz, H, P, N) if dhT is None else dhT.contiguous()
    dx, ddt, dA, dB, dC, dD, dh0 = _ssd_bwd(dy, dhT, x, dt, A, B, C, D, ckpt)
    dB = dB.view(Bsz, T, G, H // G, N).sum(3)  # a group's heads share B and C
    dC = dC.view(Bsz, T, G, H // G, N).sum(3)
    return dx, ddt, dA.sum(0), dB, dC, dD.sum(0), dh0, None


_ssd_fwd.register_autograd(_ssd_backward, setup_context=_ssd_setup_context)


# -- causal depthwise conv + SiLU ------------------------------------------------------------------


@torch.library.custom_op("hybridssm::mamba2_conv_silu_fwd", mutates_args=())
def _conv_silu_fwd(x: Tensor, wt: Tensor, bias: Tensor, st: Tensor) -> Tensor:
    """``silu(conv(x) + bias)`` ``[B, T, C]``; ``wt [K, C]``, ``st [B, K-1, C]`` (time-major)."""
    return ext().conv_silu_fwd(x, wt, bias, st)


@_conv_silu_fwd.register_fake
def _conv_silu_fwd_fake(x, wt, bias, st):
    return x.new_empty(x.shape)


@torch.library.custom_op("hybridssm::mamba2_conv_silu_bwd", mutates_args=())
def _conv_silu_bwd(
    dy: Tensor, x: Tensor, wt: Tensor, bias: Tensor, st: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dwt, dbias, dst)`` of :func:`_conv_silu_fwd`."""
    return tuple(ext().conv_silu_bwd(dy, x, wt, bias, st))


@_conv_silu_bwd.register_fake
def _conv_silu_bwd_fake(dy, x, wt, bias, st):
    return x.new_empty(x.shape), torch.empty_like(wt), torch.empty_like(bias), torch.empty_like(st)


def _conv_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, dy):
    x, wt, bias, st = ctx.saved_tensors
    dy = x.new_zeros(x.shape) if dy is None else dy.contiguous()
    return _conv_silu_bwd(dy, x, wt, bias, st)


_conv_silu_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)


# -- gated RMSNorm ---------------------------------------------------------------------------------


@torch.library.custom_op("hybridssm::mamba2_gnorm_fwd", mutates_args=())
def _gnorm_fwd(y: Tensor, z: Tensor, w: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """``(rmsnorm_groups(y * silu(z)) * w [B, T, E], rstd [B, T, groups])``."""
    out, rstd = ext().gnorm_fwd(y, z, w, groups, eps)
    return out, rstd


@_gnorm_fwd.register_fake
def _gnorm_fwd_fake(y, z, w, groups, eps):
    return y.new_empty(y.shape), y.new_empty((*y.shape[:2], groups))


@torch.library.custom_op("hybridssm::mamba2_gnorm_bwd", mutates_args=())
def _gnorm_bwd(
    dout: Tensor, y: Tensor, z: Tensor, w: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dy, dz, dw)`` of :func:`_gnorm_fwd`."""
    return tuple(ext().gnorm_bwd(dout, y, z, w, rstd))


@_gnorm_bwd.register_fake
def _gnorm_bwd_fake(dout, y, z, w, rstd):
    return y.new_empty(y.shape), y.new_empty(y.shape), torch.empty_like(w)


def _gnorm_setup_context(ctx, inputs, output) -> None:
    y, z, w, groups, eps = inputs
    ctx.save_for_backward(y, z, w, output[1])


def _gnorm_backward(ctx, dout, _drstd):
    y, z, w, rstd = ctx.saved_tensors
    dout = y.new_zeros(y.shape) if dout is None else dout.contiguous()
    dy, dz, dw = _gnorm_bwd(dout, y, z, w, rstd)
    return dy, dz, dw, None, None


_gnorm_fwd.register_autograd(_gnorm_backward, setup_context=_gnorm_setup_context)
