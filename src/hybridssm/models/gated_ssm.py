"""``gated_ssm``: a stack of GatedSSM blocks (seed 002), the seed's lightweight temporal model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hybridssm.blocks import ResidualBlock
from hybridssm.config import ModelConfig, check_positive
from hybridssm.mixers.gated_ssm import GatedSSMMixer
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["GatedSSMConfig", "GatedSSM"]


@dataclass(frozen=True, kw_only=True)
class GatedSSMConfig(ModelConfig):
    """Options of ``gated_ssm`` (the seed's names and defaults).

    Attributes:
        state_size: N, the width of the B/C projections.
        expand_factor: inner width = ``expand_factor * hidden_size``.
        conv_size: width of the causal mean-pool window.
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2,
        window_size=60, dropout=0.1,
    )

    state_size: int = 16
    expand_factor: int = 2
    conv_size: int = 4
    num_layers: int = 2

    def validate(self) -> None:
        super().validate()
        for name in ("state_size", "expand_factor", "conv_size"):
            check_positive(name, getattr(self, name))


@register_model("gated_ssm", GatedSSMConfig)
class GatedSSM(SequenceModel):
    """Stack of pre-norm residual GatedSSM blocks; see :mod:`hybridssm.mixers.gated_ssm`."""

    def build_blocks(self, c: GatedSSMConfig) -> list:
        return [
            ResidualBlock(
                GatedSSMMixer(
                    c.hidden_size,
                    state_size=c.state_size,
                    expand_factor=c.expand_factor,
                    conv_size=c.conv_size,
                ),
                c.hidden_size,
            )
            for _ in range(c.num_layers)
        ]
