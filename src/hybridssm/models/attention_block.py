"""The attention + FFN residual layer of ``hybrid`` and ``transformer``, built from the shared
attention options (:class:`hybridssm.config.AttentionConfig`)."""

from __future__ import annotations

from torch import nn

from hybridssm.blocks import ResidualBlock
from hybridssm.config import AttentionConfig
from hybridssm.layers import FFN
from hybridssm.mixers.attention import AttentionMixer, attention_impl

__all__ = ["attention_block"]


def attention_block(
    c: AttentionConfig, *, window_size: int | None, pre_norm: bool = True, dropout: float = 0.0,
    norm: str = "layernorm", norm_eps: float | None = None, bias: bool = True,
    ffn: nn.Module | None = None,
) -> ResidualBlock:
    """``x + drop(attn(norm(x)))`` then ``x + drop(ffn(norm(x)))`` with ``c``'s attention and FFN
    options; ``window_size`` None is full attention. Additive positions belong to the model; RoPE
    is applied inside the attention. ``bias``: in the attention's projections; ``ffn``: the FFN
    module (None: ``c``'s ``ffn_multiplier`` and ``ffn_activation``, with biases)."""
    d = c.hidden_size
    mixer = AttentionMixer(
        d,
        c.num_heads,
        c.attn_head_dim,
        window_size=window_size,
        qk_layernorm=c.qk_layernorm,
        positional="rope" if c.positional == "rope" else "none",
        impl=attention_impl(c.chunked_attention, c.memory_efficient_attention),
        chunk_size=c.chunk_size,
        rope_theta=c.rope_theta,
        num_kv_heads=c.num_kv_heads,
        attention_dropout=c.attention_dropout,
        bias=bias,
    )
    if ffn is None:
        ffn = FFN(d, c.ffn_multiplier, activation=c.ffn_activation)
    return ResidualBlock(mixer, d, ffn=ffn, pre_norm=pre_norm, dropout=dropout, norm=norm,
                         norm_eps=norm_eps)
