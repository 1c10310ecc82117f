"""Griffin's recurrent block with the RG-LRU (the seed's ``:griffin_lru`` backbone).

De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
Language Models", section 2.4; the layout follows ``recurrentgemma``'s ``RecurrentBlock``::

    y   = gelu_tanh(W_y x)                                   # [B, T, W]  gate branch
    u   = conv_K(W_x x)                                      # [B, T, W]  causal depthwise conv
    r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_i u_t + b_i)   # block-diagonal, per gate head
    log a_t = -8 * softplus(Lambda) * r_t                    # fp32
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)      # fp32 state
    out = W_out(h * y)

First-position rule (as the references): at a sequence's first position (stream position 0, and
after a ``reset``, which restores ``pos = 0``) ``a = 0`` and the ``sqrt(1 - a^2)`` factor is 1, so
``h_0 = i_0 * u_0``. The state carries each row's position ``pos [B]`` so that a continuation from
a state never applies the rule again.

The ``sqrt`` has its gradient clipped at 1000 (the references' ``SqrtBoundDerivative``): as
``a -> 1`` the true derivative ``1 / (2 sqrt(1 - a^2))`` blows up and produces NaNs in low precision.
The recurrence is :func:`hybridssm.ops.linear_rnn.linear_rnn` (Hillis-Steele scan, fp32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.checks import check_positive, largest_divisor_at_most
from hybridssm.layers import inverse_softplus, mark_fp32_no_decay
from hybridssm.mixers.base import Mixer, finish_state, state_dtype, valid_mask
from hybridssm.ops.conv import causal_conv1d
from hybridssm.ops.linear_rnn import linear_rnn
from hybridssm.ops.step import MixerStep

__all__ = ["RGLRUMixer", "RGLRUState", "RGLRUStepWeights", "default_gate_heads"]

MAX_SQRT_GRADIENT = 1000.0  # the references' bound on d sqrt(x) / dx
RECURRENCE_POWER = 8.0  # c in a = sigma(Lambda)^(c r)
# recurrentgemma scales the output projection's init variance by 2 / num_layers; a backbone factory
# does not know the depth, so we assume the hybrid's default of 6 layers.
FINAL_INIT_VARIANCE = 2.0 / 6.0


class RGLRUState(NamedTuple):
    conv: Tensor  # [B, W, K-1] last raw inputs of the conv (W = lru_width)
    h: Tensor  # [B, W] RG-LRU state, fp32 (the wider of fp32 and the parameters' dtype)
    pos: Tensor  # [B] int64 positions consumed (0: the next input is a sequence's first)


class RGLRUStepWeights(NamedTuple):
    """The parameters the fused step reads (``csrc/step/rglru.h``), in its order."""

    linear_y_weight: Tensor  # [W, d]
    linear_y_bias: Tensor  # [W]
    linear_x_weight: Tensor  # [W, d]
    linear_x_bias: Tensor  # [W]
    conv_weight: Tensor  # [W, K]
    conv_bias: Tensor  # [W]
    input_gate_weight: Tensor  # [G, W/G, W/G]
    input_gate_bias: Tensor  # [G, W/G]
    a_gate_weight: Tensor  # [G, W/G, W/G]
    a_gate_bias: Tensor  # [G, W/G]
    a_param: Tensor  # [W] Lambda
    linear_out_weight: Tensor  # [d, W]
    linear_out_bias: Tensor  # [d]


class _SqrtBoundDerivative(torch.autograd.Function):
    """``sqrt(x)`` whose backward is ``g / sqrt(max(4x, 1 / MAX_SQRT_GRADIENT^2))``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / MAX_SQRT_GRADIENT**2))


def default_gate_heads(width: int) -> int:
    """The smallest number of gate heads dividing ``width`` with blocks of at most 64 channels."""
    return width // largest_divisor_at_most(width, 64)


class RGLRUMixer(Mixer):
    """Griffin's recurrent block as a mixer ``[B, T, d] -> [B, T, d]``.

    Args:
        hidden_size: ``d``, the model width.
        conv_size: temporal width ``K`` of the causal depthwise conv (the seed's ``conv_size``, 4).
        lru_width: ``W``, width of the recurrence (default ``hidden_size``).
        gate_heads: number of diagonal blocks of the input and recurrence gates (must divide ``W``;
            default :func:`default_gate_heads`: blocks of at most 64 channels).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        conv_size: int = 4,
        lru_width: int | None = None,
        gate_heads: int | None = None,
    ) -> None:
        super().__init__()
        check_positive("conv_size", conv_size)
        W = hidden_size if lru_width is None else lru_width
        if not isinstance(W, int) or W < 1:
            raise ValueError(f"option 'lru_width' must be a positive integer or None, got {lru_width!r}")
        H = default_gate_heads(W) if gate_heads is None else gate_heads
        if not isinstance(H, int) or H < 1 or W % H:
            raise ValueError(
                f"option 'gate_heads' must be a positive divisor of lru_width={W}, got {gate_heads!r}"
            )
        self.hidden_size, self.lru_width, self.conv_size, self.gate_heads = hidden_size, W, conv_size, H
        bw = W // H
        d = hidden_size

        # recurrentgemma's init: input projections N(0, 1/d), output N(0, scale/W), zero biases.
        self.linear_y = nn.Linear(d, W)
        self.linear_x = nn.Linear(d, W)
        self.linear_out = nn.Linear(W, d)
        inits = ((self.linear_y, 1 / d), (self.linear_x, 1 / d), (self.linear_out, FINAL_INIT_VARIANCE / W))
        for lin, var in inits:
            nn.init.normal_(lin.weight, std=math.sqrt(var))
            nn.init.zeros_(lin.bias)
        # Conv1D: N(0, 0.01 / K) weights (weight[:, K-1] multiplies the current input), zero bias.
        self.conv_weight = nn.Parameter(torch.randn(W, conv_size) * math.sqrt(0.01 / conv_size))
        self.conv_bias = nn.Parameter(torch.zeros(W))
        # Block-diagonal gates [H, in, out] applied as u_h @ w_h; BlockDiagonalLinear's N(0, 1/bw).
        self.input_gate_weight = nn.Parameter(torch.randn(H, bw, bw) / math.sqrt(bw))
        self.input_gate_bias = nn.Parameter(torch.zeros(H, bw))
        self.a_gate_weight = nn.Parameter(torch.randn(H, bw, bw) / math.sqrt(bw))
        self.a_gate_bias = nn.Parameter(torch.zeros(H, bw))
        # Lambda: softplus(Lambda) = -0.5 log(u), u ~ U(0.81, 0.998), i.e. the base radius
        # sigma(Lambda) = exp(-softplus(Lambda)) in [0.9, 0.999] (Griffin appendix A).
        u = torch.empty(W).uniform_(0.9**2, 0.999**2)
        sp = -0.5 * torch.log(u)
        self.a_param = mark_fp32_no_decay(nn.Parameter(inverse_softplus(sp)))

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> RGLRUState:
        device, dtype = self._device_dtype(device, dtype)
        W = self.lru_width
        return RGLRUState(
            conv=torch.zeros(batch_size, W, self.conv_size - 1, device=device, dtype=dtype),
            h=torch.zeros(batch_size, W, device=device, dtype=state_dtype(dtype)),
            pos=torch.zeros(batch_size, device=device, dtype=torch.int64),
        )

    def _gate(self, u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Block-diagonal linear + sigmoid: ``u [B, T, W]`` -> ``[B, T, W]``."""
        B, T, _ = u.shape
        uh = u.reshape(B, T, self.gate_heads, -1)  # [B, T, H, bw]
        z = torch.einsum("bthi,hij->bthj", uh, weight.to(u.dtype)) + bias.to(u.dtype)
        return torch.sigmoid(z).reshape(B, T, self.lru_width)

    def forward(
        self,
        x: Tensor,
        state: RGLRUState | None = None,
        *,
        lengths: Tensor | None = None,
        inplace: bool = False,
    ) -> tuple[Tensor, RGLRUState]:
        """``x [B, T, d]`` -> ``(y [B, T, d], RGLRUState)``."""
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, device=x.device, dtype=x.dtype)
        y = F.gelu(self.linear_y(x), approximate="tanh")  # [B, T, W]
        u, conv_state = causal_conv1d(self.linear_x(x), self.conv_weight, self.conv_bias, state.conv, lengths)

        gate_i = self._gate(u, self.input_gate_weight, self.input_gate_bias)
        gate_a = self._gate(u, self.a_gate_weight, self.a_gate_bias)
        acc = state.h.dtype
        log_a = -RECURRENCE_POWER * gate_a.to(acc) * F.softplus(self.a_param.to(acc))  # [B, T, W]
        a = torch.exp(log_a)
        mult = _SqrtBoundDerivative.apply(-torch.expm1(2.0 * log_a))  # sqrt(1 - a^2)
        pos = state.pos.unsqueeze(1) + torch.arange(T, device=x.device)  # [B, T]
        first = (pos == 0).unsqueeze(-1)  # the first-position rule: a = 0, factor 1
        a = torch.where(first, 0.0, a)
        mult = torch.where(first, 1.0, mult)
        inp = (u * gate_i).to(acc) * mult

        mask = valid_mask(lengths, T, x.device)
        if mask is not None:  # padded steps leave the state untouched
            m = mask.unsqueeze(-1)
            a, inp = torch.where(m, a, 1.0), torch.where(m, inp, 0.0)
        h, h_last = linear_rnn(a, inp, state.h)  # [B, T, W], [B, W] in fp32
        out = self.linear_out(h.to(x.dtype) * y)
        steps = lengths if lengths is not None else T
        new = RGLRUState(conv=conv_state, h=h_last.to(acc), pos=state.pos + steps)
        return out, finish_state(state, new, inplace)

    def step_spec(self) -> MixerStep:
        """The fused one-frame step (kind ``griffin_lru``), for every configuration. The kernel
        keeps the first-position rule with the state's own ``pos`` and advances it."""
        weights = RGLRUStepWeights(
            self.linear_y.weight, self.linear_y.bias, self.linear_x.weight, self.linear_x.bias,
            self.conv_weight, self.conv_bias, self.input_gate_weight, self.input_gate_bias,
            self.a_gate_weight, self.a_gate_bias, self.a_param, self.linear_out.weight, self.linear_out.bias,
        )
        return MixerStep("griffin_lru", weights, (), (RECURRENCE_POWER,))
