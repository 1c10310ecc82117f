"""``ss_transformer``: the State Space Transformer (seeds 000/001).

Every block runs a selective SSM and causal multi-head attention in parallel on the same normed
input, fuses them with a learned per-channel sigmoid gate ``g * ssm + (1 - g) * attn`` (or Hymba's
normalised mean, ``fusion="mean"``), adds the residual, then a pre-norm FFN (x4) with its residual.
The seed's SSM path collapsed to a scalar-gated moving average; here it is a real selective scan:
Mamba (``ssm="mamba"``, default) or Mamba-2 (``ssm="mamba2"``), the same mixers as those models.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from torch import nn

from hybridssm.backbones import SEED_OPTIONS, build_backbone_mixer, get_backbone
from hybridssm.blocks import FUSIONS, ParallelBlock
from hybridssm.config import MambaOptions, ModelConfig, check_bool, check_choice, check_positive
from hybridssm.layers import FFN
from hybridssm.mixers.attention import AttentionMixer
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["SSTransformerConfig", "SSTransformer"]


_MAMBA_DEFAULTS = {f.name: f.default for f in fields(MambaOptions)}


@dataclass(frozen=True, kw_only=True)
class SSTransformerConfig(MambaOptions, ModelConfig):
    """Options of ``ss_transformer`` (the seed's names and defaults, plus ``ssm`` and ``fusion``),
    and the SSM path's ``mamba_ssm`` / ``transformers`` options with the ``mamba`` model's defaults
    (:class:`~hybridssm.config.MambaOptions`): ``dt_min``, ``dt_max``, ``dt_init_floor``,
    ``conv_bias`` and ``proj_bias`` act on either path; ``dt_rank`` and ``dt_init`` (Mamba-1's
    time-step projection) only with ``ssm="mamba"`` and are refused with ``ssm="mamba2"``.

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
        super().validate()
        for name in ("state_size", "num_heads", "head_dim", "expand_factor", "conv_size"):
            check_positive(name, getattr(self, name))
        check_choice("ssm", self.ssm, ("mamba", "mamba2"))
        check_choice("fusion", self.fusion, tuple(FUSIONS))
        if self.fusion_norm is not None:
            check_bool("fusion_norm", self.fusion_norm)
        if self.ssm == "mamba2":
            for name in ("dt_rank", "dt_init"):
                if getattr(self, name) != _MAMBA_DEFAULTS[name]:
                    raise ValueError(
                        f"option {name!r}={getattr(self, name)!r} changes nothing with ssm='mamba2' "
                        "(Mamba-2 has no time-step projection); it is allowed only with ssm='mamba'"
                    )

    def ssm_options(self) -> dict:
        """The SSM path's mixer options beyond the seed's (those its mixer has)."""
        return self.mamba_options() if self.ssm == "mamba" else self.selective_options()


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
