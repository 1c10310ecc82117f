"""``ss_transformer``: the State Space Transformer (seeds 000/001).

Every block runs a selective SSM and causal multi-head attention in parallel on the same normed
input, fuses them with a learned per-channel sigmoid gate ``g * ssm + (1 - g) * attn`` (or Hymba's
normalised mean, ``fusion="mean"``), adds the residual, then a pre-norm FFN (x4) with its residual.
The seed's SSM path collapsed to a scalar-gated moving average; here it is a real selective scan:
Mamba (``ssm="mamba"``, default) or Mamba-2 (``ssm="mamba2"``), the same mixers as those models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from hybridssm.backbones import SEED_OPTIONS, build_backbone_mixer, get_backbone
from hybridssm.blocks import FUSIONS, ParallelBlock
from hybridssm.config import (
    Mamba2Options,
    MambaOptions,
    ModelConfig,
    check_bool,
    check_choice,
    check_positive,
    own_options,
)
from hybridssm.layers import FFN
from hybridssm.mixers.attention import AttentionMixer
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["SSTransformerConfig", "SSTransformer"]


@dataclass(frozen=True, kw_only=True)
class SSTransformerConfig(MambaOptions, Mamba2Options, ModelConfig):
    """Options of ``ss_transformer`` (the seed's names and defaults, plus ``ssm`` and ``fusion``),
    and the SSM path's ``mamba_ssm`` / ``transformers`` options with the ``mamba`` and ``mamba2``
    models' defaults: ``dt_min``, ``dt_max``, ``dt_init_floor``, ``conv_bias`` and ``proj_bias``
    act on either path; Mamba-1's own (:class:`~hybridssm.config.MambaOptions`: ``dt_rank``,
    ``dt_init``) only with ``ssm="mamba"``, Mamba-2's own (:class:`~hybridssm.config.Mamba2Options`:
    ``ssm_head_dim``, ``num_groups``, ``scan_chunk_size``, ``A_init_range``, ``dt_limit``,
    ``D_has_hdim``, ``norm_before_gate``; ``norm_eps`` also reaches its gated norm) only with
    ``ssm="mamba2"``: the other path refuses them (:attr:`path_options`).

    Attributes:
        state_size, expand_factor, conv_size: the SSM path's options.
        num_heads, head_dim: the attention path (full causal attention).
        ssm: ``"mamba"`` (selective scan) or ``"mamba2"`` (SSD).
        fusion: ``"gate"`` (the seed's sigmoid gate) or ``"mean"`` (Hymba's normalised mean).
        fusion_norm: RMS-normalise each path's output (learnable per-channel gains) before fusing.
            ``None`` (default) keeps each fusion's own form: the seed's gate on the raw outputs,
            Hymba's mean on normalised ones. ``True`` with the gate is Hymba's per-path
            normalisation (see :class:`hybridssm.blocks.GateFusion`; ``hybridssm train
            ss_transformer ... --fusion-norm`` / ``--no-fusion-norm``, measured in the README).
        window_size: the seeds' expected sequence length (stored; never a limit).
    """

    # Each path's own options and their defaults; set away from its default, one is refused
    # with the other path.
    path_options: ClassVar[dict[str, dict[str, Any]]] = {
        "mamba": own_options(MambaOptions), "mamba2": own_options(Mamba2Options),
    }

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, num_layers=6, num_heads=4, head_dim=64, expand_factor=2,
        conv_size=4, dropout=0.1,
    )

    num_layers: int = 6
    state_size: int = 16
    num_heads: int = 4
    head_dim: int = 64
    expand_factor: int = 2
    conv_size: int = 4
    dropout: float = 0.1
    ssm: str = "mamba"
    fusion: str = "gate"
    fusion_norm: bool | None = None

    def validate(self) -> None:
        # the path and the sizes d_inner needs first: the Mamba-2 options' checks use them
        for name in ("state_size", "num_heads", "head_dim", "expand_factor", "conv_size"):
            check_positive(name, getattr(self, name))
        check_choice("ssm", self.ssm, tuple(self.path_options))
        for path, options in self.path_options.items():
            for name, default in options.items():
                if path != self.ssm and getattr(self, name) != default:
                    raise ValueError(
                        f"option {name!r}={getattr(self, name)!r} changes nothing with "
                        f"ssm={self.ssm!r} (an option of the {path!r} path); it is allowed only "
                        f"with ssm={path!r}"
                    )
        super().validate()
        check_choice("fusion", self.fusion, tuple(FUSIONS))
        if self.fusion_norm is not None:
            check_bool("fusion_norm", self.fusion_norm)

    def ssm_options(self) -> dict[str, Any]:
        """The SSM path's mixer options beyond the seed's (those its mixer has)."""
        return self.mamba_options() if self.ssm == "mamba" else self.mamba2_options()


@register_model("ss_transformer", SSTransformerConfig)
class SSTransformer(SequenceModel):
    """Parallel SSM + attention blocks with gated fusion and an FFN."""

    def build_blocks(self, c: SSTransformerConfig) -> list[nn.Module]:
        d = c.hidden_size
        seed = {k: getattr(c, k) for k in SEED_OPTIONS}
        norm = {} if c.fusion_norm is None else {"normalize": c.fusion_norm}
        return [
            ParallelBlock(
                build_backbone_mixer(get_backbone(c.ssm), d, seed, c.ssm_options()),
                AttentionMixer(d, c.num_heads, c.head_dim),
                d,
                fusion=FUSIONS[c.fusion](d, **norm),
                ffn=FFN(d, 4),
                norm=c.norm,
                norm_eps=c.norm_eps,
            )
            for _ in range(c.num_layers)
        ]
