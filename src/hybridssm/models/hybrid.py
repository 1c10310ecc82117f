"""``hybrid``: the Jamba-style stack (seed 004) — a backbone interleaved with attention.

Layer ``i`` (0-based) is attention when ``(i + 1) % attention_every == 0`` (the seed's 1-based
rule); every other layer is ``norm -> backbone mixer -> residual`` with no FFN. Attention layers are
attention + FFN, each with a residual (the seed's ``build_attention_layer``). The layout is data:
:func:`layer_pattern`. The seed's default backbone ``:mamba`` was its simplified GatedSSM; here
``mamba`` is the true selective-scan Mamba and ``gated_ssm`` is the seed's block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from hybridssm.backbones import (
    SEED_OPTIONS,
    build_backbone_mixer,
    get_backbone,
    validate_backbone_options,
)
from hybridssm.blocks import ResidualBlock
from hybridssm.config import (
    ModelConfig,
    check_bool,
    check_choice,
    check_positive,
)
from hybridssm.layers import FFN, POSITIONAL, additive_positions
from hybridssm.mixers.attention import AttentionMixer, attention_impl
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["HybridConfig", "Hybrid", "layer_pattern", "build_layer"]


@dataclass(frozen=True, kw_only=True)
class HybridConfig(ModelConfig):
    """Options of ``hybrid`` (the seed's names and defaults, plus ``positional`` and
    ``backbone_options``).

    Attributes:
        attention_every: every N-th layer (1-based) is attention.
        backbone: a registered backbone name (``hybridssm.backbones.list_backbones()``) or a
            factory ``(hidden_size, **options) -> mixer`` (in memory only; register it to save).
        backbone_options: options of the backbone beyond the seed's Mamba ones.
        state_size, expand_factor, conv_size: go to every backbone that takes them.
        num_heads, head_dim: attention heads and their width.
        window_size: the sliding attention window (W keys including the current one) when
            ``use_sliding_window``; otherwise the expected sequence length (never a limit).
        qk_layernorm: LayerNorm on queries and keys per head.
        chunked_attention, memory_efficient_attention, chunk_size: the seed's attention variants.
        pre_norm: norms before the mixers (True) or after the residual adds (False).
        positional: ``none`` (the recurrent layers carry position, as in Jamba), ``sinusoidal``,
            ``rope`` or ``learned`` (absolute, up to ``max_positions``).
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=6,
        attention_every=3, num_heads=4, head_dim=64, window_size=60, use_sliding_window=True,
        dropout=0.1, pre_norm=True, qk_layernorm=True,
    )

    num_layers: int = 6
    attention_every: int = 3
    backbone: str | Callable[..., nn.Module] = "mamba"
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    state_size: int = 16
    expand_factor: int = 2
    conv_size: int = 4
    num_heads: int = 4
    head_dim: int = 64
    use_sliding_window: bool = True
    qk_layernorm: bool = True
    chunked_attention: bool = False
    memory_efficient_attention: bool = False
    chunk_size: int = 32
    pre_norm: bool = True
    dropout: float = 0.1
    positional: str = "none"
    max_positions: int = 4096

    def validate(self) -> None:
        super().validate()
        for name in ("attention_every", "state_size", "expand_factor", "conv_size", "num_heads",
                     "head_dim", "chunk_size", "max_positions"):
            check_positive(name, getattr(self, name))
        for name in ("use_sliding_window", "qk_layernorm", "chunked_attention",
                     "memory_efficient_attention", "pre_norm"):
            check_bool(name, getattr(self, name))
        attention_impl(self.chunked_attention, self.memory_efficient_attention)
        check_choice("positional", self.positional, POSITIONAL)
        validate_backbone_options(get_backbone(self.backbone), self.backbone_options)

    def to_dict(self) -> dict[str, Any]:
        if callable(self.backbone):
            raise ValueError(
                "this hybrid's backbone is an unregistered factory, which cannot be saved: call "
                "hybridssm.register_backbone('name', factory) and build with backbone='name'"
            )
        return super().to_dict()

    @property
    def backbone_name(self) -> str:
        return get_backbone(self.backbone).name



def layer_pattern(
    num_layers: int = 6, attention_every: int = 3, backbone: str | Callable = "mamba"
) -> list[str]:
    """The layer kinds of a hybrid, e.g. ``layer_pattern(6, 3)`` ->
    ``['mamba', 'mamba', 'attention', 'mamba', 'mamba', 'attention']`` (the seed's examples)."""
    check_positive("num_layers", num_layers)
    check_positive("attention_every", attention_every)
    name = get_backbone(backbone).name
    return ["attention" if (i + 1) % attention_every == 0 else name for i in range(num_layers)]


def _make_layer(kind: str, c: HybridConfig) -> ResidualBlock:
    d = c.hidden_size
    if kind == "attention":
        mixer = AttentionMixer(
            d,
            c.num_heads,
            c.head_dim,
            window_size=c.window_size if c.use_sliding_window else None,
            qk_layernorm=c.qk_layernorm,
            positional="rope" if c.positional == "rope" else "none",
            impl=attention_impl(c.chunked_attention, c.memory_efficient_attention),
            chunk_size=c.chunk_size,
        )
        return ResidualBlock(mixer, d, ffn=FFN(d, 4), pre_norm=c.pre_norm)
    seed = {k: getattr(c, k) for k in SEED_OPTIONS}
    mixer = build_backbone_mixer(get_backbone(c.backbone), d, seed, c.backbone_options)
    return ResidualBlock(mixer, d, pre_norm=c.pre_norm)


@register_model("hybrid", HybridConfig)
class Hybrid(SequenceModel):
    """Backbone layers interleaved with attention + FFN layers; see :func:`layer_pattern`."""

    def build_blocks(self, c: HybridConfig) -> list[nn.Module]:
        kinds = layer_pattern(c.num_layers, c.attention_every, c.backbone)
        return [_make_layer(kind, c) for kind in kinds]

    def build_positional(self, c: HybridConfig) -> nn.Module | None:
        return additive_positions(c.positional, c.hidden_size, c.max_positions)

    @property
    def layer_pattern(self) -> list[str]:
        c = self.config
        return layer_pattern(c.num_layers, c.attention_every, c.backbone)


def build_layer(kind: str, *, hidden_size: int = 256, **opts: Any) -> ResidualBlock:
    """One residual layer of a kind, as the seed's ``build_*_layer``: ``kind`` is ``"attention"``
    or a backbone name. ``opts`` are ``hybrid`` options (``pre_norm``, ``num_heads``,
    ``state_size``, ``backbone_options``, ...)."""
    backbone = opts.pop("backbone", kind if kind != "attention" else "gated_ssm")
    cfg = HybridConfig.from_options(embed_dim=hidden_size, hidden_size=hidden_size,
                                    backbone=backbone, **opts)
    return _make_layer(kind, cfg)
