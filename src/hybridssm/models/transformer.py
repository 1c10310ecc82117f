"""``transformer``: the attention-only baseline (a causal pre-norm Transformer encoder stack).

Blocks: ``x + attn(norm(x))`` then ``x + ffn(norm(x))`` (FFN x4, GELU), as the seeds' attention
layer; positions by RoPE (default), sinusoidal (textbook or the seeds') or learned absolute
encodings, or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from hybridssm.config import AttentionConfig
from hybridssm.layers import additive_positions
from hybridssm.models.attention_block import attention_block
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["TransformerConfig", "Transformer"]

@dataclass(frozen=True, kw_only=True)
class TransformerConfig(AttentionConfig):
    """Options of ``transformer`` (our defaults; DESIGN §2): the shared attention options of
    :class:`~hybridssm.config.AttentionConfig`, with ``num_layers`` 4, ``positional="rope"`` and
    ``head_dim`` None = ``min(64, max(1, hidden_size // num_heads))`` (64 at the defaults; fits small
    widths such as ``hidden_size=32``; see :attr:`attn_head_dim`). Dropout applies between blocks.
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, num_layers=4, num_heads=4, head_dim=64, positional="rope", dropout=0.1,
        window_size=60,
    )

    num_layers: int = 4
    head_dim: int | None = None
    positional: str = "rope"


@register_model("transformer", TransformerConfig)
class Transformer(SequenceModel):
    """Stack of pre-norm attention + FFN blocks; see :mod:`hybridssm.mixers.attention`."""

    def build_positional(self, c: TransformerConfig) -> nn.Module | None:
        return additive_positions(c.positional, c.hidden_size, c.max_positions)

    def build_blocks(self, c: TransformerConfig) -> list:
        window = c.window_size if c.use_sliding_window else None
        return [
            attention_block(c, window_size=window, norm=c.norm, norm_eps=c.norm_eps)
            for _ in range(c.num_layers)
        ]
