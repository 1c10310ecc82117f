"""Depthwise causal 1-D convolution as a module, with its streaming state (the seed's ``CausalConv1d``).

``x [B, T, C] -> y [B, T, C]``; state ``conv [B, C, K-1]`` = the last ``K-1`` raw inputs (zeros at the
start). The maths lives in :func:`hybridssm.ops.conv.causal_conv1d`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hybridssm.ops.conv import causal_conv1d

__all__ = ["CausalConv1d"]


class CausalConv1d(nn.Module):
    """Depthwise causal conv: ``y_t[c] = bias[c] + sum_k weight[c, k] * x_{t-K+1+k}[c]``.

    Args:
        channels: C.
        kernel_size: K (``weight[:, K-1]`` multiplies the current input).
        bias: learn a per-channel bias (Mamba: yes).
    """

    def __init__(self, channels: int, kernel_size: int, *, bias: bool = True) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        # nn.Conv1d's default init for a depthwise conv: U(+-1/sqrt(fan_in)), fan_in = K.
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound)) if bias else None

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Zeros ``[B, C, K-1]``."""
        device = device if device is not None else self.weight.device
        return torch.zeros(
            batch_size, self.channels, self.kernel_size - 1, device=device, dtype=dtype or self.weight.dtype
        )

    def forward(
        self, x: Tensor, state: Tensor | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]`` -> ``(y [B, T, C], new_state [B, C, K-1])``; with ``lengths`` the state is
        each row's last ``K-1`` inputs before its length."""
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        return causal_conv1d(x, self.weight, self.bias, state, lengths)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"
