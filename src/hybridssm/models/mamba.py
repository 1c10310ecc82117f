"""``mamba``: a stack of Mamba-1 residual blocks (Gu & Dao 2023), the seed's Mamba model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybridssm.blocks import ResidualBlock
from hybridssm.config import MambaOptions, SelectiveSSMConfig
from hybridssm.mixers.mamba import MambaMixer
from hybridssm.models.base import SequenceModel
from hybridssm.registry import register_model

__all__ = ["MambaConfig", "Mamba", "MambaBlock"]


@dataclass(frozen=True, kw_only=True)
class MambaConfig(MambaOptions, SelectiveSSMConfig):
    """Options of ``mamba``: the seed's Mamba options and defaults (:class:`SSMConfig`), the
    ``mamba_ssm`` / ``transformers`` ones of :class:`SelectiveSSMConfig` and of
    :class:`~hybridssm.config.MambaOptions` (``dt_rank``, ``dt_init``).

    ``window_size`` is the expected sequence length (stored only; never a limit)."""

    def mixer_options(self) -> dict[str, Any]:
        return dict(super().mixer_options(), dt_rank=self.dt_rank, dt_init=self.dt_init)


def MambaBlock(
    hidden_size: int, *, state_size: int = 16, expand_factor: int = 2, conv_size: int = 4,
    pre_norm: bool = True, norm: str = "layernorm", norm_eps: float | None = None, **mixer_options: Any,
) -> ResidualBlock:
    """The seed's Mamba layer: ``x + MambaMixer(norm(x))`` (no FFN), with its streaming state;
    ``mixer_options`` are :class:`~hybridssm.mixers.mamba.MambaMixer`'s (``dt_rank``, ...)."""
    mixer = MambaMixer(hidden_size, state_size=state_size, expand_factor=expand_factor,
                       conv_size=conv_size, **mixer_options)
    return ResidualBlock(mixer, hidden_size, pre_norm=pre_norm, norm=norm, norm_eps=norm_eps)


@register_model("mamba", MambaConfig)
class Mamba(SequenceModel):
    """Input projection -> ``num_layers`` pre-norm Mamba blocks -> final norm -> last timestep."""

    def build_blocks(self, c: MambaConfig) -> list:
        return [
            ResidualBlock(MambaMixer(c.hidden_size, **c.mixer_options()), c.hidden_size,
                          norm=c.norm, norm_eps=c.norm_eps)
            for _ in range(c.num_layers)
        ]
