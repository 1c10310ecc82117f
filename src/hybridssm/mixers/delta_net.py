"""DeltaNet mixer (and the shared layer of Gated DeltaNet, :mod:`hybridssm.mixers.gated_delta_net`).

Per layer (``x [B, T, d]``, ``H`` heads of key width ``K`` and value width ``Vh = expand_v * K``)::

    q, k, v = silu(conv_4(W_q x)), silu(conv_4(W_k x)), silu(conv_4(W_v x))   # causal depthwise
    q, k    = q / |q|, k / |k|                                                # per head, eps 1e-6
    beta    = sigmoid(W_b x)                         # [B, T, H]; 2 * sigmoid with allow_neg_eigval
    log a   = -exp(A_log) * softplus(W_a x + dt_bias)   # gated only (Mamba-2 style); else a = 1
    S_t     = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;   o_t = S_t^T q_t / sqrt(K)
    y       = W_o (RMSNorm_head(o) [* silu(W_g x) when gated])

Papers: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length" (DeltaNet); Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule". The recurrence is :func:`hybridssm.ops.delta_rule.delta_rule` (chunkwise WY form for
sequences, the recurrence itself for a single step).

Sizes that fit any width: ``head_dim`` defaults to ``hidden_size // num_heads`` when ``num_heads``
is given, else ``min(64, hidden_size)``; ``num_heads`` defaults to ``max(1, hidden_size //
head_dim)``. So ``hidden_size=256`` gives 4 heads of 64 and ``hidden_size=32`` one head of 32.

State (DESIGN §2): ``DeltaNetState(conv_q [B, H*K, c-1], conv_k [B, H*K, c-1], conv_v [B, H*Vh,
c-1], S [B, H, K, Vh])`` with ``c = conv_size``; ``S`` in the wider of fp32 and the parameters' dtype.
Right padding (``lengths``) becomes identity steps: ``beta = 0`` and ``log a = 0`` there.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.checks import check_bool, check_positive
from hybridssm.layers import RMSNorm, init_dt_bias, mark_fp32_no_decay
from hybridssm.mixers.base import Mixer, finish_state, state_dtype, valid_mask
from hybridssm.ops.conv import causal_conv1d
from hybridssm.ops.delta_rule import delta_rule
from hybridssm.ops.step import MixerStep

__all__ = ["DeltaNetMixer", "DeltaNetState", "DeltaNetStepWeights"]

QK_NORM_EPS = 1e-6


class DeltaNetState(NamedTuple):
    conv_q: Tensor  # [B, H*K, conv_size-1] last raw (pre-conv) query projections
    conv_k: Tensor  # [B, H*K, conv_size-1]
    conv_v: Tensor  # [B, H*Vh, conv_size-1]
    S: Tensor  # [B, H, K, Vh] fast-weight state, fp32 (at least)


class DeltaNetStepWeights(NamedTuple):
    """The parameters the fused step reads (``csrc/step/delta_rule.h``), in its order."""

    in_proj: Tensor  # [2HK + HVh + H (+ H + HVh gated), d]
    conv_weight: Tensor  # [2HK + HVh, conv_size]
    A_log: Tensor | None  # [H], gated only
    dt_bias: Tensor | None  # [H], gated only
    o_norm_weight: Tensor  # [Vh]
    o_proj: Tensor  # [d, H Vh]


def _head_sizes(hidden_size: int, num_heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """``(num_heads, head_dim)`` with the defaults of the module docstring."""
    check_positive("hidden_size", hidden_size)
    if num_heads is not None:
        check_positive("num_heads", num_heads)
    if head_dim is not None:
        check_positive("head_dim", head_dim)
    if head_dim is None:
        head_dim = max(1, hidden_size // num_heads) if num_heads is not None else min(64, hidden_size)
    if num_heads is None:
        num_heads = max(1, hidden_size // head_dim)
    return num_heads, head_dim


def _l2norm(x: Tensor) -> Tensor:
    # x / sqrt(|x|^2 + eps), the form of FLA and transformers' Qwen3-Next
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + QK_NORM_EPS)


class DeltaNetMixer(Mixer):
    """DeltaNet as a mixer ``[B, T, d] -> [B, T, d]``; the module docstring has the equations.

    Args:
        hidden_size: d, the stream width.
        conv_size: width of the causal depthwise convs on q, k, v (>= 1; 1 = no mixing in time).
        num_heads, head_dim: H and K (defaults: see the module docstring).
        expand_v: value head width ``Vh = expand_v * head_dim`` (a positive integer result).
        scan_chunk_size: chunk length of the chunkwise delta-rule form.
        allow_neg_eigval: ``beta = 2 * sigmoid(.)``, so ``I - beta k k^T`` may have eigenvalue -1
            (Grazzi et al. 2024, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues").
    """

    gated: ClassVar[bool] = False  # Gated DeltaNet: decay gate and gated output norm

    def __init__(
        self,
        hidden_size: int,
        *,
        conv_size: int = 4,
        num_heads: int | None = None,
        head_dim: int | None = None,
        expand_v: float = 1,
        scan_chunk_size: int = 64,
        allow_neg_eigval: bool = False,
    ) -> None:
        super().__init__()
        H, K = _head_sizes(hidden_size, num_heads, head_dim)
        check_positive("conv_size", conv_size)
        check_positive("scan_chunk_size", scan_chunk_size)
        check_bool("allow_neg_eigval", allow_neg_eigval)
        Vh = expand_v * K if isinstance(expand_v, (int, float)) and not isinstance(expand_v, bool) else 0
        if Vh < 1 or Vh != int(Vh):
            raise ValueError(
                f"option 'expand_v' must be a positive number with expand_v * head_dim a positive "
                f"integer (head_dim = {K}), got {expand_v!r}"
            )
        Vh = int(Vh)
        self.hidden_size, self.num_heads, self.head_dim, self.head_v_dim = hidden_size, H, K, Vh
        self.conv_size, self.scan_chunk_size = conv_size, scan_chunk_size
        self.allow_neg_eigval = allow_neg_eigval

        # One GEMM for every projection: q, k, v, beta (+ decay, output gate when gated)
        self.split_sizes = [H * K, H * K, H * Vh, H] + ([H, H * Vh] if self.gated else [])
        self.in_proj = nn.Linear(hidden_size, sum(self.split_sizes), bias=False)
        # depthwise conv taps over [q; k; v], nn.Conv1d's default init (fan_in = conv_size)
        bound = 1.0 / math.sqrt(conv_size)
        self.conv_weight = nn.Parameter(torch.empty(2 * H * K + H * Vh, conv_size).uniform_(-bound, bound))
        if self.gated:
            # Mamba-2: A ~ U(1, 16) per head; dt ~ logU(1e-3, 1e-1) through an inverse softplus
            self.A_log = mark_fp32_no_decay(nn.Parameter(torch.empty(H).uniform_(1, 16).log()))
            self.dt_bias = mark_fp32_no_decay(nn.Parameter(init_dt_bias(H)))
        self.o_norm = RMSNorm(Vh, eps=1e-5)  # per head, weights shared over heads (as FLA)
        self.o_proj = nn.Linear(H * Vh, hidden_size, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> DeltaNetState:
        device, dtype = self._device_dtype(device, dtype)
        H, K, Vh, c = self.num_heads, self.head_dim, self.head_v_dim, self.conv_size - 1
        return DeltaNetState(
            conv_q=torch.zeros(batch_size, H * K, c, device=device, dtype=dtype),
            conv_k=torch.zeros(batch_size, H * K, c, device=device, dtype=dtype),
            conv_v=torch.zeros(batch_size, H * Vh, c, device=device, dtype=dtype),
            S=torch.zeros(batch_size, H, K, Vh, device=device, dtype=state_dtype(dtype)),
        )

    def forward(self, x: Tensor, state: DeltaNetState | None = None, *, lengths=None, inplace=False):
        B, T, _ = x.shape
        H, K, Vh = self.num_heads, self.head_dim, self.head_v_dim
        if state is None:
            state = self.init_state(B, device=x.device, dtype=x.dtype)
        q, k, v, b, *gate = self.in_proj(x).split(self.split_sizes, dim=-1)

        conv_in = torch.cat([state.conv_q, state.conv_k, state.conv_v], dim=1)  # [B, 2HK + HVh, c-1]
        qkv, conv_out = causal_conv1d(torch.cat([q, k, v], dim=-1), self.conv_weight, None, conv_in, lengths)
        q, k, v = F.silu(qkv).split([H * K, H * K, H * Vh], dim=-1)
        conv_q, conv_k, conv_v = conv_out.split([H * K, H * K, H * Vh], dim=1)

        acc = state.S.dtype
        q = _l2norm(q.view(B, T, H, K).to(acc))  # [B, T, H, K]
        k = _l2norm(k.view(B, T, H, K).to(acc))
        v = v.view(B, T, H, Vh)
        beta = torch.sigmoid(b.to(acc))  # [B, T, H]
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        g = None
        if self.gated:
            a, _ = gate
            g = -self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias.to(acc))  # [B, T, H]
        mask = valid_mask(lengths, T, x.device)
        if mask is not None:  # padded steps are identity steps: no write, no decay
            m = mask.unsqueeze(-1)
            beta = torch.where(m, beta, 0.0)
            g = torch.where(m, g, 0.0) if g is not None else None

        o, S = delta_rule(q, k, v, beta, g, state=state.S, chunk_size=self.scan_chunk_size)
        o = self.o_norm(o)  # [B, T, H, Vh]
        if self.gated:
            o = o * F.silu(gate[1].view(B, T, H, Vh).to(o.dtype))
        y = self.o_proj(o.reshape(B, T, H * Vh).to(x.dtype))
        new = DeltaNetState(conv_q=conv_q, conv_k=conv_k, conv_v=conv_v, S=S)
        return y, finish_state(state, new, inplace)

    def step_spec(self) -> MixerStep:
        """The fused one-frame step (kind ``delta_net`` or ``gated_delta_net``), for every
        configuration."""
        H, K, Vh = self.num_heads, self.head_dim, self.head_v_dim
        weights = DeltaNetStepWeights(
            self.in_proj.weight, self.conv_weight, getattr(self, "A_log", None),
            getattr(self, "dt_bias", None), self.o_norm.weight, self.o_proj.weight,
        )
        kind = "gated_delta_net" if self.gated else "delta_net"
        # K^-0.5 is the delta rule's default output scale (hybridssm.ops.delta_rule)
        return MixerStep(kind, weights, (H, K, Vh, int(self.allow_neg_eigval)),
                         (QK_NORM_EPS, self.o_norm.eps, K**-0.5))
