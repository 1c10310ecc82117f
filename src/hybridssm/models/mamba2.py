"""``mamba2``: a stack of Mamba-2 (SSD) blocks (Dao & Gu, "Transformers are SSMs", 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from hybridssm.blocks import ResidualBlock
from hybridssm.config import Mamba2Options, SelectiveSSMConfig
from hybridssm.mixers.mamba2 import Mamba2Mixer
from hybridssm.models.base import SequenceModel
from hybridssm.ops.ssd import DEFAULT_CHUNK_SIZE
from hybridssm.registry import register_model

__all__ = ["Mamba2Config", "Mamba2"]


@dataclass(frozen=True, kw_only=True)
class Mamba2Config(Mamba2Options, SelectiveSSMConfig):
    """Options of ``mamba2``: the seed's Mamba sizes (:class:`~hybridssm.config.SSMConfig`) and the
    ``mamba_ssm`` / ``transformers`` options of :class:`~hybridssm.config.SelectiveSSMConfig` and
    :class:`~hybridssm.config.Mamba2Options` (``ssm_head_dim``, ``num_groups``,
    ``scan_chunk_size``, ``A_init_range``, ``dt_limit``, ``D_has_hdim``, ``norm_before_gate``).

    The seeds have no Mamba-2: these defaults (and ``recommended``, the same with dropout 0.1) are
    ours, chosen to match the seeds' Mamba (hidden 256, state 16, expand 2, conv 4, 2 layers,
    window 60 stored only); ``state_size`` is N per head channel (the paper uses 64-256).
    ``norm_eps`` is also the epsilon of the gated RMSNorm (None: 1e-5, the reference's).
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2,
        window_size=60, num_groups=1, scan_chunk_size=DEFAULT_CHUNK_SIZE, dropout=0.1,
    )

    def mixer_options(self) -> dict[str, Any]:
        return dict(state_size=self.state_size, expand_factor=self.expand_factor,
                    conv_size=self.conv_size, **self.mamba2_options())


@register_model("mamba2", Mamba2Config)
class Mamba2(SequenceModel):
    """Stack of pre-norm residual Mamba-2 blocks; see :mod:`hybridssm.mixers.mamba2`."""

    def build_blocks(self, c: Mamba2Config) -> list:
        return [
            ResidualBlock(Mamba2Mixer(c.hidden_size, **c.mixer_options()), c.hidden_size,
                          norm=c.norm, norm_eps=c.norm_eps)
            for _ in range(c.num_layers)
        ]
