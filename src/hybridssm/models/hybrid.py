"""``hybrid``: the Jamba-style stack (seed 004) — a backbone interleaved with attention.

Layer ``i`` (0-based) is attention when ``(i + 1) % attention_every == 0`` (the seed's 1-based
rule; Jamba's ``attention_offset`` or an explicit ``layer_pattern`` change it); every other layer
is ``norm -> backbone mixer -> dropout -> residual`` with no FFN, except ``griffin_lru``, whose seed
layer includes Griffin's gated MLP. Attention layers are attention + FFN, each with dropout and a
residual (the seed's ``build_attention_layer``); ``backbone_ffn=True`` gives the backbone layers
that FFN too, as Jamba's decoder layers. The layout is data: :func:`layer_pattern`. The
seed's default backbone ``:mamba`` was its simplified GatedSSM; here ``mamba`` is the true
selective-scan Mamba and ``gated_ssm`` is the seed's block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from hybridssm.backbones import (
    MODEL_DEFAULTS,
    SEED_OPTIONS,
    build_backbone_mixer,
    get_backbone,
    validate_backbone_options,
)
from hybridssm.blocks import ResidualBlock
from hybridssm.config import AttentionConfig, check_bool, check_optional_positive, check_positive
from hybridssm.layers import FFN, additive_positions
from hybridssm.models.attention_block import attention_block
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["HybridConfig", "Hybrid", "layer_pattern", "build_layer"]


@dataclass(frozen=True, kw_only=True)
class HybridConfig(AttentionConfig):
    """Options of ``hybrid``: the seed's names and defaults, the attention options of
    :class:`~hybridssm.config.AttentionConfig`, and the layout options below.

    Attributes:
        attention_every: every N-th layer (1-based) is attention (the seed's rule).
        attention_offset: Jamba's ``attn_layer_offset``: layer ``i`` (0-based) is attention when
            ``i % attention_every == attention_offset``; None (default) = ``attention_every - 1``,
            the seed's rule.
        layer_pattern: an explicit per-layer list of kinds (``"attention"`` or the backbone's
            name), of length ``num_layers``; replaces ``attention_every``/``attention_offset``
            (which must then stay at their defaults). Saved in config.json.
        backbone: a registered backbone name (``hybridssm.backbones.list_backbones()``) or a
            factory ``(hidden_size, **options) -> mixer`` (in memory only; register it to save).
        backbone_options: options of the backbone beyond those it takes from the model; an
            explicit value wins over the model's ``num_heads``.
        state_size, expand_factor, conv_size: go to every backbone that takes them.
        num_heads: attention heads; also the head count of the ``rwkv``, ``delta_net`` and
            ``gated_delta_net`` backbones, as in the seed (unless ``backbone_options`` sets
            ``num_heads`` or ``head_dim``).
        window_size: the sliding attention window (W keys including the current one) when
            ``use_sliding_window``; otherwise the expected sequence length (never a limit).
        pre_norm: norms before the mixers (True) or after the residual adds (False).
        dropout: inside every layer, on the backbone's, the attention's and the FFN's output
            before each residual add (the seed's form); none between layers.
        positional: ``"none"`` by default: the recurrent layers carry position, as in Jamba, and
            nothing is added to the frames. The seed's ``Hybrid.build`` always adds its own
            encoding; ``"seed_sinusoidal"`` reproduces it exactly.
        backbone_ffn: the backbone layers get the attention layers' FFN sublayer too (False, the
            seed's layers; Jamba's decoder layers all have one). Not with a backbone whose layer
            already includes an MLP (``griffin_lru``).
        ffn_hidden_size: the FFN's hidden width; None (default) = ``ffn_multiplier * hidden_size``
            (``transformers``' ``intermediate_size``, e.g. Jamba's 14336 = 3.5 x 4096).
        attention_bias: biases in the attention's q/k/v and output projections (True, the seed's
            ``nn.Linear``; Jamba's have none, as ``transformers``' ``attention_bias=False``).
        ffn_bias: biases in the FFN's projections (True, the seed's; Jamba's ``JambaMLP`` has
            none, as ``transformers``' ``mlp_bias=False``).
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=6,
        attention_every=3, num_heads=4, head_dim=64, window_size=60, use_sliding_window=True,
        dropout=0.1, pre_norm=True, qk_layernorm=True,
    )

    num_layers: int = 6
    attention_every: int = 3
    attention_offset: int | None = None
    layer_pattern: tuple[str, ...] | None = None
    backbone: str | Callable[..., nn.Module] = "mamba"
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    state_size: int = 16
    expand_factor: int = 2
    conv_size: int = 4
    head_dim: int = 64
    use_sliding_window: bool = True
    qk_layernorm: bool = True
    pre_norm: bool = True
    dropout: float = 0.1
    backbone_ffn: bool = False
    ffn_hidden_size: int | None = None
    attention_bias: bool = True
    ffn_bias: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("attention_every", "state_size", "expand_factor", "conv_size", "head_dim"):
            check_positive(name, getattr(self, name))
        for name in ("pre_norm", "backbone_ffn", "attention_bias", "ffn_bias"):
            check_bool(name, getattr(self, name))
        check_optional_positive("ffn_hidden_size", self.ffn_hidden_size)
        if self.ffn_hidden_size is not None and self.ffn_multiplier != 4:
            raise ValueError(
                f"option 'ffn_multiplier'={self.ffn_multiplier!r} changes nothing with "
                f"ffn_hidden_size={self.ffn_hidden_size!r}; set one of them"
            )
        spec = get_backbone(self.backbone)
        validate_backbone_options(spec, self.backbone_options)
        if self.backbone_ffn and spec.mlp is not None:
            raise ValueError(
                f"option 'backbone_ffn'=True: the {spec.name!r} backbone's layer already includes "
                "its own MLP; backbone_ffn is allowed only with backbones without one"
            )
        if self.layer_pattern is not None:
            _check_explicit_pattern(self, spec.name)
        elif self.attention_offset is not None:
            if (isinstance(self.attention_offset, bool) or not isinstance(self.attention_offset, int)
                    or not 0 <= self.attention_offset < self.attention_every):
                raise ValueError(
                    f"option 'attention_offset' must be an integer in 0..attention_every - 1 = "
                    f"{self.attention_every - 1} (or None for the seed's attention_every - 1), "
                    f"got {self.attention_offset!r}"
                )

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

    @property
    def kinds(self) -> list[str]:
        """The kind of every layer: ``layer_pattern`` if given, else the periodic rule."""
        if self.layer_pattern is not None:
            return list(self.layer_pattern)
        return layer_pattern(self.num_layers, self.attention_every, self.backbone,
                             attention_offset=self.attention_offset)


def _check_explicit_pattern(c: HybridConfig, backbone: str) -> None:
    pattern = c.layer_pattern
    allowed = ("attention", backbone)
    if not isinstance(pattern, (tuple, list)) or not all(k in allowed for k in pattern):
        raise ValueError(
            f"option 'layer_pattern' must be a list of {allowed!r} (one kind per layer), "
            f"got {pattern!r}"
        )
    if len(pattern) != c.num_layers:
        raise ValueError(
            f"option 'layer_pattern' has {len(pattern)} layers but num_layers={c.num_layers}; "
            f"set num_layers={len(pattern)}"
        )
    if c.attention_every != 3 or c.attention_offset is not None:
        raise ValueError(
            "options 'attention_every'/'attention_offset' change nothing with an explicit "
            "'layer_pattern'; leave them at their defaults"
        )
    object.__setattr__(c, "layer_pattern", tuple(pattern))


def layer_pattern(
    num_layers: int = 6, attention_every: int = 3, backbone: str | Callable = "mamba", *,
    attention_offset: int | None = None,
) -> list[str]:
    """The layer kinds of a hybrid, e.g. ``layer_pattern(6, 3)`` ->
    ``['mamba', 'mamba', 'attention', 'mamba', 'mamba', 'attention']`` (the seed's examples).
    Layer ``i`` is attention when ``i % attention_every == attention_offset`` (default
    ``attention_every - 1``: the seed's 1-based rule). An unregistered factory shows as
    ``"custom"``, as in the seed."""
    check_positive("num_layers", num_layers)
    check_positive("attention_every", attention_every)
    offset = attention_every - 1 if attention_offset is None else attention_offset
    name = get_backbone(backbone).name
    return ["attention" if i % attention_every == offset else name for i in range(num_layers)]


def _ffn(c: HybridConfig) -> FFN:
    """The FFN of the attention layers (and of the backbone layers with ``backbone_ffn``)."""
    return FFN(c.hidden_size, c.ffn_multiplier, activation=c.ffn_activation, bias=c.ffn_bias,
               inner=c.ffn_hidden_size)


def _make_layer(kind: str, c: HybridConfig) -> ResidualBlock:
    d = c.hidden_size
    norms = dict(pre_norm=c.pre_norm, dropout=c.dropout, norm=c.norm, norm_eps=c.norm_eps)
    if kind == "attention":
        return attention_block(c, window_size=c.window_size if c.use_sliding_window else None,
                               bias=c.attention_bias, ffn=_ffn(c), **norms)
    spec = get_backbone(c.backbone)
    values = {k: getattr(c, k) for k in (*SEED_OPTIONS, *MODEL_DEFAULTS)}
    mixer = build_backbone_mixer(spec, d, values, c.backbone_options)
    mlp = spec.mlp
    if mlp is not None:
        ffn = FFN(d, mlp[1], activation=mlp[0])
    else:
        ffn = _ffn(c) if c.backbone_ffn else None
    return ResidualBlock(mixer, d, ffn=ffn, **norms)


@register_model("hybrid", HybridConfig)
class Hybrid(SequenceModel):
    """Backbone layers interleaved with attention + FFN layers; see :func:`layer_pattern`."""

    dropout_between_blocks = False  # the seed drops inside each layer (HybridConfig.dropout)

    def build_blocks(self, c: HybridConfig) -> list[nn.Module]:
        return [_make_layer(kind, c) for kind in c.kinds]

    def build_positional(self, c: HybridConfig) -> nn.Module | None:
        return additive_positions(c.positional, c.hidden_size, c.max_positions)

    @property
    def layer_pattern(self) -> list[str]:
        return self.config.kinds


def build_layer(kind: str, *, hidden_size: int = 256, **opts: Any) -> ResidualBlock:
    """One residual layer of a kind, as the seed's ``build_*_layer``: ``kind`` is ``"attention"``
    or a backbone name. ``opts`` are ``hybrid`` options (``pre_norm``, ``dropout``, ``num_heads``,
    ``state_size``, ``backbone_options``, ...); ``dropout`` (default 0.1, the seed's) applies to
    the layer's outputs before each residual add."""
    backbone = opts.pop("backbone", kind if kind != "attention" else "gated_ssm")
    cfg = HybridConfig.from_options(embed_dim=hidden_size, hidden_size=hidden_size,
                                    backbone=backbone, **opts)
    return _make_layer(kind, cfg)
