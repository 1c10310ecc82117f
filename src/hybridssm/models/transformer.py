"""``transformer``: the attention-only baseline (a causal pre-norm Transformer encoder stack).

Blocks: ``x + attn(norm(x))`` then ``x + ffn(norm(x))`` (FFN x4, GELU), as the seeds' attention
layer; positions by RoPE (default), sinusoidal or learned absolute encodings, or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from hybridssm.blocks import ResidualBlock
from hybridssm.config import ModelConfig, check_bool, check_choice, check_positive
from hybridssm.layers import FFN, POSITIONAL, additive_positions
from hybridssm.mixers.attention import AttentionMixer, attention_impl
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["TransformerConfig", "Transformer"]

@dataclass(frozen=True, kw_only=True)
class TransformerConfig(ModelConfig):
    """Options of ``transformer`` (our defaults; DESIGN §2).

    Attributes:
        num_heads: attention heads H.
        head_dim: width per head Dh. ``None`` (default) means ``min(64, max(1, hidden_size //
            num_heads))``: 64 at the defaults, and it fits small widths such as ``hidden_size=32``.
            See :attr:`attn_head_dim`.
        positional: ``"rope"`` (default), ``"sinusoidal"``, ``"learned"`` or ``"none"``.
        max_positions: the limit of ``positional="learned"`` (a ValueError names it past it).
        qk_layernorm: LayerNorm over Dh of q and k.
        use_sliding_window: attend to the last ``window_size`` keys (self included) instead of all.
        chunked_attention / memory_efficient_attention: training form ``"chunked"`` /
            ``"memory_efficient"`` (O(T) memory); neither = ``"sdpa"``; exclusive.
        chunk_size: their chunk (and the block of the sliding-window forms).
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, num_layers=4, num_heads=4, head_dim=64, positional="rope", dropout=0.1,
        window_size=60,
    )

    num_layers: int = 4
    num_heads: int = 4
    head_dim: int | None = None
    positional: str = "rope"
    max_positions: int = 4096
    qk_layernorm: bool = False
    use_sliding_window: bool = False
    chunked_attention: bool = False
    memory_efficient_attention: bool = False
    chunk_size: int = 32

    def validate(self) -> None:
        super().validate()
        check_positive("num_heads", self.num_heads)
        if self.head_dim is not None:
            check_positive("head_dim", self.head_dim)
        check_choice("positional", self.positional, POSITIONAL)
        check_positive("max_positions", self.max_positions)
        check_positive("chunk_size", self.chunk_size)
        for name in ("qk_layernorm", "use_sliding_window", "chunked_attention",
                     "memory_efficient_attention"):
            check_bool(name, getattr(self, name))
        attention_impl(self.chunked_attention, self.memory_efficient_attention)

    @property
    def attn_head_dim(self) -> int:
        """The head width used: ``head_dim``, else ``min(64, max(1, hidden_size // num_heads))``."""
        if self.head_dim is not None:
            return self.head_dim
        return min(64, max(1, self.hidden_size // self.num_heads))


@register_model("transformer", TransformerConfig)
class Transformer(SequenceModel):
    """Stack of pre-norm attention + FFN blocks; see :mod:`hybridssm.mixers.attention`."""

    def build_positional(self, c: TransformerConfig) -> nn.Module | None:
        return additive_positions(c.positional, c.hidden_size, c.max_positions)

    def build_blocks(self, c: TransformerConfig) -> list:
        return [
            ResidualBlock(
                AttentionMixer(
                    c.hidden_size,
                    c.num_heads,
                    c.attn_head_dim,
                    window_size=c.window_size if c.use_sliding_window else None,
                    qk_layernorm=c.qk_layernorm,
                    positional="rope" if c.positional == "rope" else "none",
                    impl=attention_impl(c.chunked_attention, c.memory_efficient_attention),
                    chunk_size=c.chunk_size,
                ),
                c.hidden_size,
                ffn=FFN(c.hidden_size, 4),
            )
            for _ in range(c.num_layers)
        ]
