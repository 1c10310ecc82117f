"""Sequence mixers: modules that own parameters and a streaming state (DESIGN §3)."""

from hybridssm.mixers.base import Mixer, check_mixer_state, finish_state, valid_mask
from hybridssm.mixers.delta_net import DeltaNetMixer, DeltaNetState
from hybridssm.mixers.gated_delta_net import GatedDeltaNetMixer
from hybridssm.mixers.gated_ssm import GatedSSMMixer, GatedSSMState

__all__ = [
    "DeltaNetMixer",
    "DeltaNetState",
    "GatedDeltaNetMixer",
    "GatedSSMMixer",
    "GatedSSMState",
    "Mixer",
    "check_mixer_state",
    "finish_state",
    "valid_mask",
]
