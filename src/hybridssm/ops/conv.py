"""Causal depthwise 1-D convolution with a streaming state.

Layout: ``x [B, T, C]``, ``weight [C, K]`` (``weight[:, K-1]`` multiplies the current input),
``bias [C]`` or None, ``state [B, C, K-1]`` = the last ``K-1`` raw inputs before ``x`` (zeros at the
start). Returns ``(y [B, T, C], final_state [B, C, K-1])``. With ``lengths [B]`` the final state is
each row's last ``K-1`` inputs up to its own length (right padding never enters it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._checks import ShapeCheck
from hybridssm.ops._dtypes import acc_dtype

__all__ = ["causal_conv1d", "causal_conv1d_ref", "conv_final_state"]


def conv_final_state(xs: Tensor, lengths: Tensor | None, width: int) -> Tensor:
    """The last ``width`` columns of ``xs [B, C, width + T]`` before each row's length, contiguous
    like the state that ``init_state`` allocates (a strided view would make a compiled step
    recompile after its first frame, on the state's new strides)."""
    if width == 0:
        return xs[:, :, :0]
    if lengths is None:
        return xs[:, :, xs.shape[2] - width :].contiguous()
    idx = lengths.view(-1, 1) + torch.arange(width, device=xs.device)  # [B, width]
    return xs.gather(2, idx.unsqueeze(1).expand(-1, xs.shape[1], -1))


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference: an explicit sum over the kernel taps, one timestep at a time."""
    B, T, C = x.shape
    K = weight.shape[1]
    acc = acc_dtype(x.dtype)
    xs = torch.cat([state.to(acc), x.transpose(1, 2).to(acc)], dim=2)  # [B, C, K-1+T]
    ys = []
    for t in range(T):
        y = (xs[:, :, t : t + K] * weight.to(acc)).sum(-1)  # [B, C]
        if bias is not None:
            y = y + bias.to(acc)
        ys.append(y)
    y = torch.stack(ys, dim=1).to(x.dtype)
    return y, conv_final_state(xs, lengths, K - 1).to(state.dtype)


def causal_conv1d_torch(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fast form: one grouped ``conv1d`` over ``[state ; x]``."""
    C, K = weight.shape
    xs = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, C, K-1+T]
    w = weight.to(x.dtype).unsqueeze(1)  # [C, 1, K]
    b = bias.to(x.dtype) if bias is not None else None
    y = F.conv1d(xs, w, b, groups=C).transpose(1, 2)  # [B, T, C]
    return y, conv_final_state(xs, lengths, K - 1).to(state.dtype)


_kernels.register("causal_conv1d", ref=causal_conv1d_ref, torch_impl=causal_conv1d_torch)


def check_conv_args(
    op: str, x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None
) -> None:
    """``ValueError`` naming the argument unless the shapes fit the layout of the module docstring."""
    check = ShapeCheck(op)
    for name, t, dims in (("x", x, "BTC"), ("weight", weight, "CK"), ("bias", bias, "C"),
                          ("state", state, "BCW"), ("lengths", lengths, "B")):
        check(name, t, dims)
    K, W = check.sizes["K"], check.sizes["W"]
    check.require(K >= 1 and W == K - 1, f"state must hold the last K-1 = {K - 1} inputs (weight is [C, K] "
                  f"with K = {K}), got {W}")


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv; see the module docstring for the layout. A wrong shape raises
    ``ValueError`` naming the argument."""
    check_conv_args("causal_conv1d", x, weight, bias, state, lengths)
    return _kernels.get("causal_conv1d", x.device)(x, weight, bias, state, lengths)
