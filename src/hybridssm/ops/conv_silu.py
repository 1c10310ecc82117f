"""Causal depthwise 1-D convolution followed by SiLU, with a streaming state (Mamba-2's conv over
``x, B, C``): ``y = silu(causal_conv1d(x, weight, bias, state))``.

Layout as :mod:`hybridssm.ops.conv`: ``x [B, T, C]``, ``weight [C, K]`` (``weight[:, K-1]`` multiplies
the current input), ``bias [C]`` or None, ``state [B, C, K-1]`` = the last ``K-1`` raw inputs before
``x``. Returns ``(y [B, T, C], final_state [B, C, K-1])``; with ``lengths [B]`` the final state is each
row's last ``K-1`` inputs up to its own length.

Backends (``hybridssm.ops._kernels``, op name ``causal_conv1d_silu``): ``ref`` and ``torch`` are
:mod:`hybridssm.ops.conv`'s forms followed by ``F.silu``; ``fused`` (CPU, float32 / float64) is one C++
pass in the ``[B, T, C]`` layout (channels contiguous, so ``x`` may be a column slice of a larger
tensor: no transposes, no concatenation with the state, no copy) whose backward recomputes the
pre-activation instead of storing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops.conv import causal_conv1d_ref, causal_conv1d_torch, check_conv_args
from hybridssm.ops.mamba2_fused import FUSED_DTYPES, conv_silu_fwd, fused_probe

__all__ = [
    "causal_conv1d_silu", "causal_conv1d_silu_ref", "causal_conv1d_silu_torch", "causal_conv1d_silu_fused",
]


def causal_conv1d_silu_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference: :func:`hybridssm.ops.conv.causal_conv1d_ref`, then SiLU."""
    y, final = causal_conv1d_ref(x, weight, bias, state, lengths)
    return F.silu(y), final


def causal_conv1d_silu_torch(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """PyTorch: one grouped ``conv1d`` (:func:`hybridssm.ops.conv.causal_conv1d_torch`), then SiLU."""
    y, final = causal_conv1d_torch(x, weight, bias, state, lengths)
    return F.silu(y), final


def _final_state(x: Tensor, st: Tensor, lengths: Tensor | None) -> Tensor:
    """The last ``K-1`` rows of ``[st ; x]`` (time-major ``[B, K-1+T, C]``) before each row's length,
    as ``[B, C, K-1]``, without concatenating the whole sequence."""
    W, T = st.shape[1], x.shape[1]
    if W == 0:
        return st.transpose(1, 2)
    if lengths is None:
        tail = x[:, max(0, T - W):]
        if tail.shape[1] < W:
            tail = torch.cat([st[:, tail.shape[1]:], tail], dim=1)
        return tail.transpose(1, 2)
    # position lengths + j (j < W) of [st ; x]: the state's row lengths + j, or x's row lengths + j - W
    pos = lengths.view(-1, 1) + torch.arange(W, device=x.device)  # [B, W]
    C = x.shape[2]
    from_x = x.gather(1, (pos - W).clamp(min=0).unsqueeze(-1).expand(-1, -1, C))
    from_st = st.gather(1, pos.clamp(max=W - 1).unsqueeze(-1).expand(-1, -1, C))
    return torch.where((pos < W).unsqueeze(-1), from_st, from_x).transpose(1, 2)


def causal_conv1d_silu_fused(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fused CPU kernel (float32 / float64; other dtypes take the PyTorch form). ``x`` may be a
    strided view with a contiguous last dim."""
    if x.dtype not in FUSED_DTYPES:
        return causal_conv1d_silu_torch(x, weight, bias, state, lengths)
    C = x.shape[2]
    if x.stride(-1) != 1 and C > 1:
        x = x.contiguous()
    wt = weight.to(x.dtype).t().contiguous()  # [K, C]
    b = bias.to(x.dtype).contiguous() if bias is not None else x.new_zeros(C)
    st = state.to(x.dtype).transpose(1, 2).contiguous()  # [B, K-1, C], time-major like x
    y = conv_silu_fwd(x, wt, b, st)
    return y, _final_state(x, st, lengths).to(state.dtype)


_kernels.register(
    "causal_conv1d_silu",
    ref=causal_conv1d_silu_ref,
    torch_impl=causal_conv1d_silu_torch,
    fused=causal_conv1d_silu_fused,
    fused_probe=fused_probe,
)


def causal_conv1d_silu(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``silu(causal depthwise conv)``; see the module docstring for the layout. A wrong shape raises
    ``ValueError`` naming the argument."""
    check_conv_args("causal_conv1d_silu", x, weight, bias, state, lengths)
    return _kernels.get("causal_conv1d_silu", x.device)(x, weight, bias, state, lengths)
