"""Sequence mixers: modules that own parameters and a streaming state (DESIGN §3)."""

from hybridssm.mixers.attention import AttentionMixer, AttentionState
from hybridssm.mixers.base import Mixer, check_mixer_state, finish_state, valid_mask
from hybridssm.mixers.gated_ssm import GatedSSMMixer, GatedSSMState

__all__ = [
    "AttentionMixer",
    "AttentionState",
    "GatedSSMMixer",
    "GatedSSMState",
    "Mixer",
    "check_mixer_state",
    "finish_state",
    "valid_mask",
]
