"""``mamba2``: a stack of Mamba-2 (SSD) blocks (Dao & Gu, "Transformers are SSMs", 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from hybridssm.blocks import ResidualBlock
from hybridssm.config import SelectiveSSMConfig, check_bool, check_positive
from hybridssm.mixers.mamba2 import Mamba2Mixer, check_mamba2_options, default_ssm_head_dim
from hybridssm.models.base import SequenceModel
from hybridssm.ops.ssd import DEFAULT_CHUNK_SIZE
from hybridssm.registry import register_model

__all__ = ["Mamba2Config", "Mamba2"]


@dataclass(frozen=True, kw_only=True)
class Mamba2Config(SelectiveSSMConfig):
    """Options of ``mamba2``.

    The seeds have no Mamba-2: these defaults (and ``recommended``, the same with dropout 0.1) are
    ours, chosen to match the seeds' Mamba (hidden 256, state 16, expand 2, conv 4, 2 layers,
    window 60 stored only).

    Attributes:
        state_size: N, the SSM state per head channel (16; the paper uses 64-256).
        expand_factor: inner width ``d_inner = expand_factor * hidden_size``.
        conv_size: width of the depthwise causal conv over x, B, C.
        ssm_head_dim: P, the SSD head width; must divide ``d_inner``. None (default): the largest
            divisor of ``d_inner`` that is at most 64 (64 at the default sizes: 8 heads).
        num_groups: G, groups of heads sharing B and C; must divide the number of heads
            (``mamba_ssm``'s ``ngroups``, ``transformers``' ``n_groups``).
        scan_chunk_size: chunk length of the chunked SSD scan (speed only; ``chunk_size`` there).
        A_init_range: ``A = -exp(A_log)`` starts at ``-U(lo, hi)`` per head ((1, 16)).
        dt_limit: ``dt`` clamped to ``(lo, hi)`` after the softplus ((0, inf): no clamp;
            ``time_step_limit``).
        D_has_hdim: the skip ``D`` per channel instead of per head (False).
        norm_before_gate: ``rmsnorm(y) * silu(z)`` instead of ``rmsnorm(y * silu(z))`` (False).
        dt_min, dt_max, dt_init_floor, conv_bias, proj_bias: :class:`SelectiveSSMConfig`.
        norm_eps: also the epsilon of the gated RMSNorm (None: 1e-5, the reference's).
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2,
        window_size=60, num_groups=1, scan_chunk_size=DEFAULT_CHUNK_SIZE, dropout=0.1,
    )

    ssm_head_dim: int | None = None
    num_groups: int = 1
    scan_chunk_size: int = DEFAULT_CHUNK_SIZE
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_limit: tuple[float, float] = (0.0, math.inf)
    D_has_hdim: bool = False
    norm_before_gate: bool = False

    def validate(self) -> None:
        super().validate()
        check_mamba2_options(self.A_init_range, self.dt_limit)
        check_bool("D_has_hdim", self.D_has_hdim)
        check_bool("norm_before_gate", self.norm_before_gate)
        for name in ("num_groups", "scan_chunk_size"):
            check_positive(name, getattr(self, name))
        if self.ssm_head_dim is not None:
            check_positive("ssm_head_dim", self.ssm_head_dim)
        d_inner = self.expand_factor * self.hidden_size
        if self.ssm_head_dim is not None and d_inner % self.ssm_head_dim:
            raise ValueError(
                f"option 'ssm_head_dim' must divide d_inner = expand_factor * hidden_size = "
                f"{d_inner}, got {self.ssm_head_dim}"
            )
        P = self.ssm_head_dim or default_ssm_head_dim(d_inner)
        if (d_inner // P) % self.num_groups:
            raise ValueError(
                f"option 'num_groups' must divide the number of heads d_inner / ssm_head_dim = "
                f"{d_inner // P}, got {self.num_groups}"
            )


    def mixer_options(self) -> dict[str, Any]:
        return dict(
            super().mixer_options(), ssm_head_dim=self.ssm_head_dim, num_groups=self.num_groups,
            scan_chunk_size=self.scan_chunk_size, A_init_range=tuple(self.A_init_range),
            dt_limit=tuple(self.dt_limit), D_has_hdim=self.D_has_hdim,
            norm_before_gate=self.norm_before_gate,
            norm_eps=1e-5 if self.norm_eps is None else self.norm_eps,
        )


@register_model("mamba2", Mamba2Config)
class Mamba2(SequenceModel):
    """Stack of pre-norm residual Mamba-2 blocks; see :mod:`hybridssm.mixers.mamba2`."""

    def build_blocks(self, c: Mamba2Config) -> list:
        return [
            ResidualBlock(Mamba2Mixer(c.hidden_size, **c.mixer_options()), c.hidden_size,
                          norm=c.norm, norm_eps=c.norm_eps)
            for _ in range(c.num_layers)
        ]
