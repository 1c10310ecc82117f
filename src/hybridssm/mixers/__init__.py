"""Sequence mixers: modules that own parameters and a streaming state (DESIGN §3)."""

from hybridssm.mixers.base import Mixer, check_mixer_state, finish_state, valid_mask
from hybridssm.mixers.gated_ssm import GatedSSMMixer, GatedSSMState
from hybridssm.mixers.mamba2 import Mamba2Mixer, Mamba2State

__all__ = [
    "GatedSSMMixer",
    "GatedSSMState",
    "Mamba2Mixer",
    "Mamba2State",
    "Mixer",
    "check_mixer_state",
    "finish_state",
    "valid_mask",
]
