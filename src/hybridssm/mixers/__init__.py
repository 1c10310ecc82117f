"""Sequence mixers: modules that own parameters and a streaming state (DESIGN §3)."""

from hybridssm.mixers.base import Mixer, check_mixer_state, finish_state, valid_mask
from hybridssm.mixers.conv import CausalConv1d
from hybridssm.mixers.gated_ssm import GatedSSMMixer, GatedSSMState
from hybridssm.mixers.mamba import MambaMixer, MambaState, SelectiveSSM

__all__ = [
    "CausalConv1d",
    "MambaMixer",
    "MambaState",
    "SelectiveSSM",
    "GatedSSMMixer",
    "GatedSSMState",
    "Mixer",
    "check_mixer_state",
    "finish_state",
    "valid_mask",
]
