"""GatedSSM mixer (seed 002): the simplified gated SSM, in its causal form only.

Per timestep (``u [B, T, E]``, ``E = d_inner = expand * hidden``)::

    xb, z   = in_proj(x)                                  # [B, T, E] each
    u       = silu(dense(causal_mean_K(xb)))              # the seed's "conv": window mean + dense
    B_t,C_t = bc_proj(u)                                  # [B, T, N] each
    dt      = softplus(dt_up(dt_down(u)))                 # [B, T, E], rank max(1, hidden // N)
    gate    = sigmoid(mean_e dt_t)                        # scalar per (b, t)
    bc      = sigmoid(sum_n B_t C_t)                      # scalar per (b, t)
    g_t     = gate * bc * u_t
    c_t     = 0.9 c_{t-1} + 0.1 g_t                       # EMA context, c_0 = 0 (fp32 state)
    y_t     = out_proj((g_t + (1 - gate) c_t) * silu(z_t))

The seed's default "legacy" scan weighted positions by their place in the whole window (not
causal, not steppable) and its ``step`` never matched the forward; only this causal form exists.
State: ``conv [B, E, K-1]`` (raw ``xb`` inputs) and ``ctx [B, E]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.mixers.base import Mixer, finish_state, state_dtype, valid_mask
from hybridssm.ops.conv import causal_conv1d
from hybridssm.ops.linear_rnn import linear_rnn
from hybridssm.ops.step import MixerStep

__all__ = ["GatedSSMMixer", "GatedSSMState", "GatedSSMStepWeights", "CONTEXT_DECAY"]

CONTEXT_DECAY = 0.9  # the seed's EMA coefficient (alpha)


class GatedSSMState(NamedTuple):
    conv: Tensor  # [B, E, K-1] last raw inputs of the mean-pool conv
    ctx: Tensor  # [B, E] EMA context, fp32


class GatedSSMStepWeights(NamedTuple):
    """The weights of the fused step (``csrc/step/gated_ssm.h``), as the parameters themselves."""

    in_w: Tensor  # [2E, d]
    in_b: Tensor | None
    conv_w: Tensor  # [E, E] (conv_proj)
    conv_b: Tensor | None
    bc_w: Tensor  # [2N, E]
    bc_b: Tensor | None
    down_w: Tensor  # [R, E]
    down_b: Tensor | None
    up_w: Tensor  # [E, R]
    up_b: Tensor | None
    out_w: Tensor  # [d, E]
    out_b: Tensor | None


class GatedSSMMixer(Mixer):
    """The seed's simplified gated SSM as a mixer ``[B, T, d] -> [B, T, d]``."""

    def __init__(
        self, hidden_size: int, *, state_size: int = 16, expand_factor: int = 2, conv_size: int = 4
    ) -> None:
        super().__init__()
        d, E, N = hidden_size, expand_factor * hidden_size, state_size
        self.d_inner, self.state_size, self.conv_size = E, N, conv_size
        dt_rank = max(1, hidden_size // state_size)
        self.in_proj = nn.Linear(d, 2 * E)
        self.conv_proj = nn.Linear(E, E)
        self.bc_proj = nn.Linear(E, 2 * N)
        self.dt_down = nn.Linear(E, dt_rank)
        self.dt_up = nn.Linear(dt_rank, E)
        self.out_proj = nn.Linear(E, d)

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> GatedSSMState:
        device, dtype = self._device_dtype(device, dtype)
        return GatedSSMState(
            conv=torch.zeros(batch_size, self.d_inner, self.conv_size - 1, device=device, dtype=dtype),
            ctx=torch.zeros(batch_size, self.d_inner, device=device, dtype=state_dtype(dtype)),
        )

    def forward(self, x: Tensor, state: GatedSSMState | None = None, *, lengths=None, inplace=False):
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, device=x.device, dtype=x.dtype)
        xb, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, E] each
        pool = xb.new_full((self.d_inner, self.conv_size), 1.0 / self.conv_size)
        pooled, conv_state = causal_conv1d(xb, pool, None, state.conv, lengths)
        u = F.silu(self.conv_proj(pooled))  # [B, T, E]

        Bt, Ct = self.bc_proj(u).chunk(2, dim=-1)  # [B, T, N] each
        dt = F.softplus(self.dt_up(self.dt_down(u)))  # [B, T, E]
        acc = state.ctx.dtype
        gate = torch.sigmoid(dt.to(acc).mean(-1, keepdim=True))  # [B, T, 1]
        bc = torch.sigmoid((Bt.to(acc) * Ct.to(acc)).sum(-1, keepdim=True))  # [B, T, 1]
        g = gate * bc * u.to(acc)  # [B, T, E]

        decay = torch.full_like(gate, CONTEXT_DECAY)
        inp = (1.0 - CONTEXT_DECAY) * g
        mask = valid_mask(lengths, T, x.device)
        if mask is not None:  # padded steps leave the context untouched
            m = mask.unsqueeze(-1)
            decay, inp = torch.where(m, decay, 1.0), torch.where(m, inp, 0.0)
        ctx, ctx_last = linear_rnn(decay.expand_as(inp), inp, state.ctx)
        y = (g + (1.0 - gate) * ctx).to(x.dtype) * F.silu(z)
        new = GatedSSMState(conv=conv_state, ctx=ctx_last.to(acc))
        return self.out_proj(y), finish_state(state, new, inplace)

    def step_spec(self) -> MixerStep:
        """This mixer's fused step: kind ``"gated_ssm"``, floats ``(CONTEXT_DECAY,)``."""
        lin = (self.in_proj, self.conv_proj, self.bc_proj, self.dt_down, self.dt_up, self.out_proj)
        w = GatedSSMStepWeights(*(t for m in lin for t in (m.weight, m.bias)))
        return MixerStep("gated_ssm", w, (), (CONTEXT_DECAY,))
