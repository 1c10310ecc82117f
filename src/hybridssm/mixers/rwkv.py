"""RWKV-6 ("Finch") layer: time-mix then channel-mix (the seed's ``:rwkv`` backbone).

Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence"; the
parameterisation and init follow the authors' RWKV-LM v6 code (``RWKV_Tmix_x060``,
``RWKV_CMix_x060``).

**Layer layout.** The paper's layer is two pre-norm sublayers::

    t   = x + TimeMix(LN_1(x))
    out = t + ChannelMix(LN_2(t))

The channel-mix's residual stream ``t`` contains the raw ``x``, which cannot be recovered from a
normalised input. So this mixer normalises its own input (``owns_norm = True``, with its own
``ln_time`` and ``ln_channel``) and returns the layer's increment ``out - x``: a block that reads
``owns_norm`` computes ``x + mixer(x)`` (no norm of its own) and that is exactly the paper's layer.
Wrapped by a block that normalises anyway (``x + mixer(LN(x))``) the layer still works but is
not the paper's: its inner residual stream is ``LN(x)`` and LN_1 follows the block's LN.

Time-mix (per timestep, ``x`` = LN_1 of the input, ``xx = x_{t-1} - x_t``)::

    m_* = LoRA_*(x + xx * mu_x)           # data-dependent token shift (ddlerp), * in w,k,v,r,g
    x_* = x + xx * (mu_* + m_*)
    r, k, v = W_r x_r, W_k x_k, W_v x_v;  g = silu(W_g x_g)
    w = -exp(d + tanh(x_w A_w) B_w)      # log decay per channel, data dependent
    o = WKV6(r, k, v, w, u)               # hybridssm.ops.wkv
    out = W_o(GroupNorm_H(o) * g)

Channel-mix: ``k = relu(W_k x_k)^2``, ``out = sigmoid(W_r x_r) * W_v k`` with a static token shift.

State ``RWKVState(shift_time [B, D], wkv [B, H, K, V] fp32, shift_channel [B, D])``: the last
normalised input of each token-shift site and the WKV state. With ``lengths`` padded steps are
identity steps (``w = 0``, ``k = 0``) and the shift states come from each row's last valid input.

**Init.** RWKV-LM scales several inits by the layer's depth ratio (``layer_id / n_layer``); the
factory does not know the depth, so the ratio is the option ``init_layer_ratio`` (default 0.5,
a middle layer). As in RWKV-LM the output projections (time-mix output, channel-mix value and
receptance) start at zero, so a fresh layer is the identity; the LoRA down-projections start at
zero too.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.checks import largest_divisor_at_most
from hybridssm.layers import LayerNorm, mark_fp32_no_decay
from hybridssm.mixers.base import Mixer, finish_state, state_dtype, valid_mask
from hybridssm.ops.step import MixerStep
from hybridssm.ops.wkv import DEFAULT_CHUNK, wkv6

__all__ = ["RWKVMixer", "RWKVState", "RWKVStepWeights", "RWKVTimeMix", "RWKVChannelMix", "default_head_dim"]

MAX_DECAY_EXPONENT = 30.0  # exp(-exp(30)) is 0 in any float: clamping keeps w finite for the op


class RWKVState(NamedTuple):
    shift_time: Tensor  # [B, D] last normalised input of the time-mix
    wkv: Tensor  # [B, H, K, V] WKV state, fp32 (the wider of fp32 and the parameters' dtype)
    shift_channel: Tensor  # [B, D] last normalised input of the channel-mix


class RWKVStepWeights(NamedTuple):
    """The parameters the fused step reads (``csrc/step/rwkv.h``), in its order."""

    ln_time_weight: Tensor  # [D]
    ln_time_bias: Tensor | None  # [D]
    mu_x: Tensor  # [D] token-shift mix of the LoRA's input
    mu_w: Tensor  # [D]
    mu_k: Tensor  # [D]
    mu_v: Tensor  # [D]
    mu_r: Tensor  # [D]
    mu_g: Tensor  # [D]
    mix_down: Tensor  # [D, 5R]
    mix_up: Tensor  # [5, R, D]
    decay: Tensor  # [D]
    decay_down: Tensor  # [D, Rd]
    decay_up: Tensor  # [Rd, D]
    bonus: Tensor  # [H, K]
    receptance: Tensor  # [D, D]
    key: Tensor  # [D, D]
    value: Tensor  # [D, D]
    gate: Tensor  # [D, D]
    output: Tensor  # [D, D]
    ln_x_weight: Tensor  # [D]
    ln_x_bias: Tensor  # [D]
    ln_channel_weight: Tensor  # [D]
    ln_channel_bias: Tensor | None  # [D]
    channel_mu_k: Tensor  # [D]
    channel_mu_r: Tensor  # [D]
    channel_key: Tensor  # [F, D]
    channel_receptance: Tensor  # [D, D]
    channel_value: Tensor  # [D, F]


def default_head_dim(width: int) -> int:
    """The largest divisor of ``width`` that is at most 64 (64 when it divides, as RWKV-6)."""
    return largest_divisor_at_most(width, 64)


def _shifted(x: Tensor, last: Tensor) -> Tensor:
    """``x_{t-1}`` for every t: ``[last ; x[:, :-1]]``."""
    # cut after the cat: a slice of size T - 1 (maybe 1) would pin T in a dynamic-length export
    return torch.cat([last.to(x.dtype).unsqueeze(1), x], dim=1)[:, :-1]


def _last_valid(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Each row's input at ``lengths - 1`` (the last one without ``lengths``): ``[B, D]``."""
    if lengths is None:
        return x[:, -1]
    idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, x.shape[-1])
    return x.gather(1, idx).squeeze(1)


def _orthogonal(lin: nn.Linear, scale: float) -> None:
    """RWKV-LM's linear init: orthogonal with gain sqrt(out/in) when out > in, times ``scale``."""
    out_f, in_f = lin.weight.shape
    if scale == 0.0:
        nn.init.zeros_(lin.weight)
        return
    gain = math.sqrt(out_f / in_f) if out_f > in_f else 1.0
    nn.init.orthogonal_(lin.weight, gain=gain * scale)


class RWKVTimeMix(nn.Module):
    """RWKV-6 time-mix on a normalised stream ``x [B, T, D]`` (see the module docstring)."""

    def __init__(
        self, dim: int, head_dim: int, mix_rank: int, decay_rank: int, layer_ratio: float, chunk: int
    ) -> None:
        super().__init__()
        self.dim, self.head_dim, self.num_heads, self.chunk = dim, head_dim, dim // head_dim, chunk
        ratio_0_to_1, ratio_1_to_0 = layer_ratio, 1.0 - layer_ratio
        ddd = torch.arange(dim, dtype=torch.float32) / dim
        n = torch.arange(dim, dtype=torch.float32) / max(dim - 1, 1)
        p = ddd**ratio_1_to_0

        def coef(value: Tensor) -> nn.Parameter:
            return mark_fp32_no_decay(nn.Parameter(value))

        # token-shift mix coefficients mu (RWKV-LM: 1 - ddd^ratio, with per-site variations)
        self.mu_x = coef(1.0 - p)
        self.mu_w = coef(1.0 - p)
        self.mu_k = coef(1.0 - p)
        self.mu_v = coef(1.0 - (p + 0.3 * ratio_0_to_1))
        self.mu_r = coef(1.0 - ddd ** (0.5 * ratio_1_to_0))
        self.mu_g = coef(1.0 - ddd ** (0.5 * ratio_1_to_0))
        # ddlerp LoRA for the five sites (w, k, v, r, g): zero down, U(+-0.01) up
        self.mix_down = nn.Parameter(torch.zeros(dim, 5 * mix_rank))
        self.mix_up = nn.Parameter(torch.empty(5, mix_rank, dim).uniform_(-0.01, 0.01))
        # decay base d_n = -6 + 5 (n / (D-1))^(0.7 + 1.3 ratio): slow to fast across channels
        self.decay = coef(-6.0 + 5.0 * n ** (0.7 + 1.3 * ratio_0_to_1))
        self.decay_down = nn.Parameter(torch.zeros(dim, decay_rank))
        self.decay_up = nn.Parameter(torch.empty(decay_rank, dim).uniform_(-0.01, 0.01))
        # bonus u ("time_faaaa")
        zigzag = ((torch.arange(dim) + 1) % 3 - 1).to(torch.float32) * 0.1
        self.bonus = coef((ratio_0_to_1 * (1.0 - n) + zigzag).view(self.num_heads, head_dim))

        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        for lin, scale in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.gate, 0.1)):
            _orthogonal(lin, scale)
        _orthogonal(self.output, 0.0)
        # per-head GroupNorm, eps = 1e-5 * head_size_divisor^2 (8^2) as RWKV-LM
        self.ln_x_eps = 64e-5
        self.ln_x_weight = mark_fp32_no_decay(nn.Parameter(torch.ones(dim)))
        self.ln_x_bias = mark_fp32_no_decay(nn.Parameter(torch.zeros(dim)))

    def forward(
        self, x: Tensor, shift: Tensor, wkv_state: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``x [B, T, D]``, ``shift [B, D]``, ``wkv_state [B, H, K, V]`` -> ``(y, new wkv state)``."""
        B, T, D = x.shape
        H, K = self.num_heads, self.head_dim
        dt = x.dtype
        xx = _shifted(x, shift) - x  # [B, T, D]
        lora = torch.tanh((x + xx * self.mu_x.to(dt)) @ self.mix_down.to(dt))  # [B, T, 5R]
        m = torch.einsum("btfr,frd->btfd", lora.view(B, T, 5, -1), self.mix_up.to(dt))  # [B, T, 5, D]
        m_w, m_k, m_v, m_r, m_g = m.unbind(2)
        x_w = x + xx * (self.mu_w.to(dt) + m_w)
        x_k = x + xx * (self.mu_k.to(dt) + m_k)
        x_v = x + xx * (self.mu_v.to(dt) + m_v)
        x_r = x + xx * (self.mu_r.to(dt) + m_r)
        x_g = x + xx * (self.mu_g.to(dt) + m_g)

        r, k, v = self.receptance(x_r), self.key(x_k), self.value(x_v)
        g = F.silu(self.gate(x_g))
        acc = wkv_state.dtype
        d = self.decay.to(acc) + (torch.tanh(x_w @ self.decay_down.to(dt)) @ self.decay_up.to(dt)).to(acc)
        w = -torch.exp(d.clamp(max=MAX_DECAY_EXPONENT))  # log decay, [B, T, D] fp32
        if mask is not None:  # identity steps at padded positions
            mm = mask.unsqueeze(-1)
            w, k = torch.where(mm, w, 0.0), torch.where(mm, k, 0.0)
        heads = (B, T, H, K)
        o, wkv_new = wkv6(
            r.reshape(heads), k.reshape(heads), v.reshape(heads), w.reshape(heads), self.bonus, wkv_state,
            self.chunk,
        )  # o [B, T, H, K] fp32
        # GroupNorm over each head's channels, in fp32
        o = F.layer_norm(o, (K,), eps=self.ln_x_eps).reshape(B, T, D)
        o = o * self.ln_x_weight.to(acc) + self.ln_x_bias.to(acc)
        return self.output(o.to(dt) * g), wkv_new


class RWKVChannelMix(nn.Module):
    """RWKV-6 channel-mix on a normalised stream: ``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2``."""

    def __init__(self, dim: int, ffn_size: int, layer_ratio: float) -> None:
        super().__init__()
        ddd = torch.arange(dim, dtype=torch.float32) / dim
        p = ddd ** (1.0 - layer_ratio)
        self.mu_k = mark_fp32_no_decay(nn.Parameter(1.0 - p))
        self.mu_r = mark_fp32_no_decay(nn.Parameter(1.0 - p))
        self.key = nn.Linear(dim, ffn_size, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(ffn_size, dim, bias=False)
        _orthogonal(self.key, 1.0)
        _orthogonal(self.receptance, 0.0)
        _orthogonal(self.value, 0.0)

    def forward(self, x: Tensor, shift: Tensor) -> Tensor:
        dt = x.dtype
        xx = _shifted(x, shift) - x
        k = torch.relu(self.key(x + xx * self.mu_k.to(dt))) ** 2
        return torch.sigmoid(self.receptance(x + xx * self.mu_r.to(dt))) * self.value(k)


class RWKVMixer(Mixer):
    """An RWKV-6 layer (time-mix + channel-mix) as a mixer that owns its norms.

    ``forward(x)`` takes the residual stream and returns ``TimeMix + ChannelMix`` increments, so
    that ``x + mixer(x)`` is the paper's layer (module docstring).

    Args:
        hidden_size: ``D``.
        head_dim: WKV head width ``K = V`` (must divide ``D``; default :func:`default_head_dim`,
            or ``D / num_heads`` when ``num_heads`` is given).
        num_heads: number of WKV heads (must divide ``D``; the seed's hybrid passes its own
            ``num_heads``); with ``head_dim`` too, the two must agree.
        mix_lora_rank: rank of the token-shift LoRA (RWKV-6: 32).
        decay_lora_rank: rank of the decay LoRA (RWKV-6: 64).
        ffn_size: channel-mix width (default ``int(3.5 D) // 32 * 32`` as RWKV-6, at least 32).
        scan_chunk_size: chunk length of the chunked WKV (default 16).
        init_layer_ratio: the depth ratio ``layer_id / n_layer`` RWKV-LM's init uses, in [0, 1].
    """

    owns_norm = True  # forward takes the raw residual stream: wrap as x + mixer(x)

    def __init__(
        self,
        hidden_size: int,
        *,
        head_dim: int | None = None,
        num_heads: int | None = None,
        mix_lora_rank: int = 32,
        decay_lora_rank: int = 64,
        ffn_size: int | None = None,
        scan_chunk_size: int = DEFAULT_CHUNK,
        init_layer_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        D = hidden_size
        if num_heads is not None:
            bad = isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1
            if bad or D % num_heads:
                raise ValueError(
                    f"option 'num_heads' of the rwkv backbone must be a positive divisor of "
                    f"hidden_size={D}, got {num_heads!r} (or set backbone_options={{'head_dim': ...}})"
                )
            if head_dim is not None and head_dim * num_heads != D:
                raise ValueError(
                    f"options 'head_dim'={head_dim!r} and 'num_heads'={num_heads!r} of the rwkv "
                    f"backbone disagree: head_dim * num_heads must equal hidden_size={D}"
                )
            head_dim = D // num_heads
        K = default_head_dim(D) if head_dim is None else head_dim
        if not isinstance(K, int) or K < 1 or D % K:
            raise ValueError(
                f"option 'head_dim' must be a positive divisor of hidden_size={D}, got {head_dim!r}"
            )
        for name, val in (("mix_lora_rank", mix_lora_rank), ("decay_lora_rank", decay_lora_rank),
                          ("scan_chunk_size", scan_chunk_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"option {name!r} must be a positive integer, got {val!r}")
        F_ = max(32, int(3.5 * D) // 32 * 32) if ffn_size is None else ffn_size
        if not isinstance(F_, int) or F_ < 1:
            raise ValueError(f"option 'ffn_size' must be a positive integer or None, got {ffn_size!r}")
        if not isinstance(init_layer_ratio, (int, float)) or not 0.0 <= init_layer_ratio <= 1.0:
            raise ValueError(
                f"option 'init_layer_ratio' must be a number in [0, 1], got {init_layer_ratio!r}"
            )
        self.hidden_size, self.head_dim, self.num_heads = D, K, D // K
        self.ln_time = LayerNorm(D)
        ratio = float(init_layer_ratio)
        self.time_mix = RWKVTimeMix(D, K, mix_lora_rank, decay_lora_rank, ratio, scan_chunk_size)
        self.ln_channel = LayerNorm(D)
        self.channel_mix = RWKVChannelMix(D, F_, ratio)

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> RWKVState:
        device, dtype = self._device_dtype(device, dtype)
        D, H, K = self.hidden_size, self.num_heads, self.head_dim
        return RWKVState(
            shift_time=torch.zeros(batch_size, D, device=device, dtype=dtype),
            wkv=torch.zeros(batch_size, H, K, K, device=device, dtype=state_dtype(dtype)),
            shift_channel=torch.zeros(batch_size, D, device=device, dtype=dtype),
        )

    def forward(
        self,
        x: Tensor,
        state: RWKVState | None = None,
        *,
        lengths: Tensor | None = None,
        inplace: bool = False,
    ) -> tuple[Tensor, RWKVState]:
        """``x [B, T, D]`` (the residual stream) -> ``(layer(x) - x, RWKVState)``."""
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, device=x.device, dtype=x.dtype)
        mask = valid_mask(lengths, T, x.device)
        h = self.ln_time(x)
        a, wkv_new = self.time_mix(h, state.shift_time, state.wkv, mask)
        t = x + a
        c_in = self.ln_channel(t)
        y = a + self.channel_mix(c_in, state.shift_channel)
        new = RWKVState(
            shift_time=_last_valid(h, lengths).to(state.shift_time.dtype),
            wkv=wkv_new.to(state.wkv.dtype),
            shift_channel=_last_valid(c_in, lengths).to(state.shift_channel.dtype),
        )
        return y, finish_state(state, new, inplace)

    def step_spec(self) -> MixerStep:
        """The fused one-frame layer (kind ``rwkv``: norms, time-mix, WKV, channel-mix), for every
        configuration; like ``forward`` it takes the raw residual stream and returns the increment."""
        tm, cm = self.time_mix, self.channel_mix
        weights = RWKVStepWeights(
            self.ln_time.weight, self.ln_time.bias, tm.mu_x, tm.mu_w, tm.mu_k, tm.mu_v, tm.mu_r, tm.mu_g,
            tm.mix_down, tm.mix_up, tm.decay, tm.decay_down, tm.decay_up, tm.bonus, tm.receptance.weight,
            tm.key.weight, tm.value.weight, tm.gate.weight, tm.output.weight, tm.ln_x_weight, tm.ln_x_bias,
            self.ln_channel.weight, self.ln_channel.bias, cm.mu_k, cm.mu_r, cm.key.weight,
            cm.receptance.weight, cm.value.weight,
        )
        floats = (self.ln_time.eps, tm.ln_x_eps, self.ln_channel.eps, MAX_DECAY_EXPONENT)
        return MixerStep("rwkv", weights, (), floats)
