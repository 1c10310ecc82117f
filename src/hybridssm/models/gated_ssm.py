"""``gated_ssm``: a stack of GatedSSM blocks (seed 002), the seed's lightweight temporal model."""

from __future__ import annotations

from dataclasses import dataclass

from hybridssm.blocks import ResidualBlock
from hybridssm.config import SSMConfig
from hybridssm.mixers.gated_ssm import GatedSSMMixer
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["GatedSSMConfig", "GatedSSM"]


@dataclass(frozen=True, kw_only=True)
class GatedSSMConfig(SSMConfig):
    """Options of ``gated_ssm``: the seed's Mamba options and defaults (:class:`SSMConfig`);
    ``state_size`` is the width of the B/C projections, ``conv_size`` the mean-pool window."""


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
                norm=c.norm,
                norm_eps=c.norm_eps,
            )
            for _ in range(c.num_layers)
        ]
