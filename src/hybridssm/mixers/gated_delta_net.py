"""Gated DeltaNet mixer: DeltaNet with a Mamba-2 style decay gate and a gated output norm.

Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule". The layer
is :class:`hybridssm.mixers.delta_net.DeltaNetMixer` with ``gated = True``: per head and step,
``log a_t = -exp(A_log) * softplus(W_a x_t + dt_bias)`` multiplies the state before the delta update,
and the output is ``RMSNorm_head(o) * silu(W_g x)``. Options, defaults and state are DeltaNet's.
"""

from __future__ import annotations

from hybridssm.mixers.delta_net import DeltaNetMixer, DeltaNetState

__all__ = ["GatedDeltaNetMixer", "DeltaNetState"]


class GatedDeltaNetMixer(DeltaNetMixer):
    """Gated DeltaNet as a mixer ``[B, T, d] -> [B, T, d]``; options as :class:`DeltaNetMixer`."""

    gated = True
