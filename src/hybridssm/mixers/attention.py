"""Causal multi-head self-attention as a mixer (Vaswani et al. 2017), with the seeds' options.

``x [B, T, d] -> q, k, v [B, T, H, Dh]`` (linear projections) -> optional QK-LayerNorm over ``Dh``
(Dehghani et al. 2023; the seeds' ``qk_layernorm``) -> optional RoPE at each token's absolute
position -> causal attention (:mod:`hybridssm.ops.attention`) -> ``o_proj -> [B, T, d]``.

* ``window_size=W``: sliding window, W keys including the current one; ``None`` = full attention.
* ``num_prefix=P``: the first P tokens of the stream stay visible to every later token and keep
  their own cache slots (Hymba's meta tokens).
* ``num_memory_kv=M``: M learned key/value vectors per head seen by every query (no position,
  not part of the state): Hymba's seed-compatible "kv" meta tokens.

State ``AttentionState(k, v, pos)``: ``k, v [B, H, P + S, Dh]``, ``pos [B]`` int64 = tokens this
layer has consumed (prefix included). S = W with a window (a ring: position p >= P lives in slot
``P + (p - P) % W``), else ``max_len`` (default 4096; slot ``p``). ``forward(x)`` without a state is
the training path (no cache, the ``impl`` form); with a state it is the cached path, which returns
the updated cache and is differentiable (truncated BPTT continues through it). A full cache
raises ``ValueError`` (naming ``max_len``) when an input would go past it, in eager mode only: a
compiled step past capacity is not checked (its writes clamp to the last slot). ``inplace=True``
is the streaming path (O(1) writes); use the functional path when backpropagating.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.checks import check_bool, check_nonnegative, check_positive, check_probability
from hybridssm.layers import LayerNorm, apply_rope, rope_cos_sin
from hybridssm.mixers.base import Mixer, finish_state
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops.attention import IMPLS, attention, attention_cached
from hybridssm.ops.step import MixerStep

__all__ = [
    "AttentionMixer",
    "AttentionState",
    "AttentionStepWeights",
    "DEFAULT_MAX_LEN",
    "POSITIONAL_IN_MIXER",
    "attention_impl",
]

DEFAULT_MAX_LEN = 4096
POSITIONAL_IN_MIXER = ("none", "rope")  # sinusoidal / learned are added at the model level


def attention_impl(chunked_attention: bool, memory_efficient_attention: bool) -> str:
    """The seeds' two flags -> the training form; they are exclusive."""
    if chunked_attention and memory_efficient_attention:
        raise ValueError(
            "options 'chunked_attention' and 'memory_efficient_attention' are exclusive; "
            "got both True"
        )
    if memory_efficient_attention:
        return "memory_efficient"
    return "chunked" if chunked_attention else "sdpa"


class AttentionState(NamedTuple):
    k: Tensor  # [B, H, P + S, Dh] keys (rotated when positional="rope")
    v: Tensor  # [B, H, P + S, Dh] values
    pos: Tensor  # [B] int64 tokens consumed by this layer (prefix tokens included)


class AttentionStepWeights(NamedTuple):
    """The fused step's weights (``ops/csrc/step/attention.h``, in this order): the parameters
    themselves, None where the mixer has none."""

    qkv_weight: Tensor  # [(H + 2 H_kv) Dh, d]: q heads, k heads, v heads
    qkv_bias: Tensor | None
    o_weight: Tensor  # [d, H Dh]
    o_bias: Tensor | None
    q_norm_weight: Tensor | None  # [Dh]
    q_norm_bias: Tensor | None
    k_norm_weight: Tensor | None
    k_norm_bias: Tensor | None
    mem_k: Tensor | None  # [M, H_kv, Dh]
    mem_v: Tensor | None


class AttentionMixer(Mixer):
    """Causal self-attention ``[B, T, d] -> [B, T, d]`` with a fixed-size streaming cache.

    Args:
        hidden_size: d, the width of the stream.
        num_heads: H.
        head_dim: Dh; the attention width is ``H * Dh`` (need not equal ``d``).
        window_size: sliding window W (keys including self), or None for full attention.
        qk_layernorm: LayerNorm over ``Dh`` of q and k (one norm each, shared by the heads).
        positional: ``"none"`` or ``"rope"`` (rotary, applied here; additive encodings belong to
            the model).
        impl: training form, one of ``"sdpa"``, ``"chunked"``, ``"memory_efficient"``.
        chunk_size: query / key chunk of the chunked and memory-efficient forms and the block of
            the sliding-window forms.
        num_prefix: P global prefix tokens (Hymba's meta tokens).
        num_memory_kv: M learned always-visible key/value pairs per head.
        rope_theta: RoPE's frequency base (10000).
        num_kv_heads: key/value heads Hk (grouped-query attention; must divide H; default H).
            The projection makes ``H + 2 Hk`` heads and the cache holds ``Hk``; each key/value
            head serves ``H / Hk`` consecutive query heads (``transformers``' ``repeat_kv``).
        attention_dropout: dropout on the attention probabilities, in training without a state
            (needs ``impl="sdpa"`` and full attention without prefix or memory keys).
        bias: biases in the q/k/v and output projections (True; Jamba's and LLaMA's have none).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        window_size: int | None = None,
        qk_layernorm: bool = False,
        positional: str = "none",
        impl: str = "sdpa",
        chunk_size: int = 32,
        num_prefix: int = 0,
        num_memory_kv: int = 0,
        rope_theta: float = 10000.0,
        num_kv_heads: int | None = None,
        attention_dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_positive("hidden_size", hidden_size)
        check_bool("bias", bias)
        check_positive("num_heads", num_heads)
        check_positive("head_dim", head_dim)
        if window_size is not None:
            check_positive("window_size", window_size)
        check_positive("chunk_size", chunk_size)
        check_nonnegative("num_prefix", num_prefix)
        check_nonnegative("num_memory_kv", num_memory_kv)
        if positional not in POSITIONAL_IN_MIXER:
            raise ValueError(
                f"option 'positional' of AttentionMixer must be one of "
                f"{', '.join(map(repr, POSITIONAL_IN_MIXER))}; got {positional!r} "
                "(sinusoidal and learned positions are added by the model)"
            )
        if impl not in IMPLS:
            raise ValueError(f"option 'impl' must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
        H, Dh = num_heads, head_dim
        Hk = H if num_kv_heads is None else num_kv_heads
        check_positive("num_kv_heads", Hk)
        if H % Hk:
            raise ValueError(f"option 'num_kv_heads' must divide num_heads={H}, got {num_kv_heads!r}")
        check_probability("attention_dropout", attention_dropout)
        if attention_dropout > 0 and (
            impl != "sdpa" or window_size is not None or num_prefix or num_memory_kv
        ):
            raise ValueError(
                f"option 'attention_dropout'={attention_dropout!r} needs impl='sdpa' and full "
                "attention without prefix tokens or memory keys"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hk, Dh
        self.window_size, self.num_prefix = window_size, num_prefix
        self.impl, self.chunk_size = impl, chunk_size
        self.positional, self.rope_theta = positional, float(rope_theta)
        self.attention_dropout = float(attention_dropout)
        self.qkv_proj = nn.Linear(hidden_size, (H + 2 * Hk) * Dh, bias=bias)  # q, k, v in one GEMM
        self.o_proj = nn.Linear(H * Dh, hidden_size, bias=bias)
        self.q_norm = LayerNorm(Dh) if qk_layernorm else None
        self.k_norm = LayerNorm(Dh) if qk_layernorm else None
        if num_memory_kv:
            # small random init, as learned prefix / register tokens usually get (std 0.02)
            self.mem_k = nn.Parameter(torch.empty(num_memory_kv, Hk, Dh))
            self.mem_v = nn.Parameter(torch.empty(num_memory_kv, Hk, Dh))
            nn.init.normal_(self.mem_k, std=0.02)
            nn.init.normal_(self.mem_v, std=0.02)
        else:
            self.mem_k = self.mem_v = None

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> AttentionState:
        """Empty cache: ``P + W`` slots with a window, else ``P + max_len`` (default 4096)."""
        device, dtype = self._device_dtype(device, dtype)
        if self.window_size is not None:
            S = self.window_size
        else:
            S = DEFAULT_MAX_LEN if max_len is None else max_len
            check_positive("max_len", S)
        shape = (batch_size, self.num_kv_heads, self.num_prefix + S, self.head_dim)
        return AttentionState(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            pos=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def state_max_len(self, state: AttentionState) -> int | None:
        """S of a full-attention cache (None for a sliding-window ring)."""
        if self.window_size is not None:
            return None
        return state.k.shape[2] - self.num_prefix

    def _check_capacity(self, state: AttentionState, lengths: Tensor | None, T: int) -> None:
        if self.window_size is not None or torch.compiler.is_compiling():
            return
        cap = state.k.shape[2]  # positions 0 .. P + S - 1
        need = int((state.pos + (T if lengths is None else lengths)).max())
        if need > cap:
            S = cap - self.num_prefix
            raise ValueError(
                f"attention cache full: max_len={S} input positions"
                f"{f' (+ {self.num_prefix} prefix slots)' if self.num_prefix else ''}, but this "
                f"input needs {need - self.num_prefix}; raise it with init_state(max_len=...) or "
                "forward(..., max_len=...), or use a sliding window (use_sliding_window=True / "
                "window_size) for an unbounded stream"
            )

    # -- forward --------------------------------------------------------------------------------
    def _qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        H, Hk, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        # q [B, T, H, Dh]; k, v [B, T, Hk, Dh]
        q, k, v = self.qkv_proj(x).view(B, T, H + 2 * Hk, Dh).split([H, Hk, Hk], dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.positional == "rope":
            acc = acc_dtype(q.dtype)
            cs = rope_cos_sin(positions, Dh, self.rope_theta, acc)
            q = apply_rope(q, positions, cos_sin=cs)
            k = apply_rope(k, positions, cos_sin=cs)
        return q, k, v

    def forward(
        self, x: Tensor, state: AttentionState | None = None, *, lengths: Tensor | None = None,
        inplace: bool = False,
    ) -> tuple[Tensor, AttentionState | None]:
        """``x [B, T, d]`` -> ``(y [B, T, d], state)``; without a state the training path (returns
        None as the state), with one the cached path (returns the updated cache)."""
        B, T, _ = x.shape
        t = torch.arange(T, device=x.device)
        if state is None:
            q, k, v = self._qkv(x, t.unsqueeze(0).expand(B, T))
            g = self.num_heads // self.num_kv_heads
            if g > 1:  # each key/value head serves g consecutive query heads
                k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
            mk, mv = (None, None) if self.mem_k is None else (
                self.mem_k.repeat_interleave(g, dim=1), self.mem_v.repeat_interleave(g, dim=1)
            )
            if self.training and self.attention_dropout > 0:  # full causal sdpa (checked at build)
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    dropout_p=self.attention_dropout,
                ).transpose(1, 2)
                return self.o_proj(out.flatten(2).to(x.dtype)), None
            out = attention(
                q, k, v, window=self.window_size, num_prefix=self.num_prefix, mem_k=mk,
                mem_v=mv, impl=self.impl, chunk_size=self.chunk_size,
            )
            return self.o_proj(out.flatten(2).to(x.dtype)), None
        self._check_capacity(state, lengths, T)
        q, k, v = self._qkv(x, state.pos.unsqueeze(1) + t)
        out, (ck, cv, pos) = attention_cached(
            q, k, v, state.k, state.v, state.pos, window=self.window_size,
            num_prefix=self.num_prefix, lengths=lengths, mem_k=self.mem_k, mem_v=self.mem_v,
            inplace=inplace,
        )
        y = self.o_proj(out.reshape(B, T, -1).to(x.dtype))
        return y, finish_state(state, AttentionState(ck, cv, pos), inplace)

    # -- fused step -----------------------------------------------------------------------------
    def step_spec(self) -> MixerStep | None:
        """The fused step of one frame (kind ``"attention"``), or None where it does not apply:
        weights not on the CPU or not float32 / float64 (the kernel's dtypes), or q/k norms that
        are not :class:`~hybridssm.layers.LayerNorm` (a replaced module). Options: heads, kv heads,
        ``Dh``, window (0 = full cache), prefix slots, rope; floats: softmax scale ``Dh^-0.5``, rope
        base, q and k norm eps. Built from the live parameters on each call (nothing cached)."""
        w = self.qkv_proj.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64):
            return None
        qn, kn = self.q_norm, self.k_norm
        if qn is not None and not (isinstance(qn, LayerNorm) and isinstance(kn, LayerNorm)):
            return None
        H = self.num_heads
        weights = AttentionStepWeights(
            self.qkv_proj.weight, self.qkv_proj.bias, self.o_proj.weight, self.o_proj.bias,
            qn.weight if qn is not None else None, qn.bias if qn is not None else None,
            kn.weight if kn is not None else None, kn.bias if kn is not None else None,
            self.mem_k, self.mem_v,
        )
        # grouped kv heads and the rope base under either name, as the mixer's options define them
        H_kv = getattr(self, "num_kv_heads", H)
        base = float(self.rope_theta if hasattr(self, "rope_theta") else self.rope_base)
        rope = int(self.positional == "rope")
        ints = (H, H_kv, self.head_dim, self.window_size or 0, self.num_prefix, rope)
        eps = (qn.eps, kn.eps) if qn is not None else (0.0, 0.0)
        return MixerStep("attention", weights, ints, (self.head_dim**-0.5, base, *eps))
