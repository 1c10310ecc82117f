"""``mamba``: a stack of Mamba-1 residual blocks (Gu & Dao 2023), the seed's Mamba model."""

from __future__ import annotations

from dataclasses import dataclass

from hybridssm.blocks import ResidualBlock
from hybridssm.config import SSMConfig
from hybridssm.mixers.mamba import MambaMixer
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["MambaConfig", "Mamba", "MambaBlock"]


@dataclass(frozen=True, kw_only=True)
class MambaConfig(SSMConfig):
    """Options of ``mamba``: the seed's Mamba options and defaults (:class:`SSMConfig`);
    ``window_size`` is the expected sequence length (stored only; never a limit)."""


def MambaBlock(
    hidden_size: int, *, state_size: int = 16, expand_factor: int = 2, conv_size: int = 4,
    pre_norm: bool = True,
) -> ResidualBlock:
    """The seed's Mamba layer: ``x + MambaMixer(LayerNorm(x))`` (no FFN), with its streaming state."""
    mixer = MambaMixer(hidden_size, state_size=state_size, expand_factor=expand_factor, conv_size=conv_size)
    return ResidualBlock(mixer, hidden_size, pre_norm=pre_norm)


@register_model("mamba", MambaConfig)
class Mamba(SequenceModel):
    """Input projection -> ``num_layers`` pre-norm Mamba blocks -> final norm -> last timestep."""

    def build_blocks(self, c: MambaConfig) -> list:
        return [
            MambaBlock(c.hidden_size, state_size=c.state_size, expand_factor=c.expand_factor,
                       conv_size=c.conv_size)
            for _ in range(c.num_layers)
        ]
