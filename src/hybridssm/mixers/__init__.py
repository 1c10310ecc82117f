"""Sequence mixers: modules that own parameters and a streaming state (DESIGN §3)."""

from hybridssm.mixers.base import Mixer, check_mixer_state, finish_state, valid_mask
from hybridssm.mixers.delta_net import DeltaNetMixer, DeltaNetState
from hybridssm.mixers.gated_delta_net import GatedDeltaNetMixer
from hybridssm.mixers.gated_ssm import GatedSSMMixer, GatedSSMState
from hybridssm.mixers.gru import GRUMixer, GRUState
from hybridssm.mixers.mamba2 import Mamba2Mixer, Mamba2State
from hybridssm.mixers.rglru import RGLRUMixer, RGLRUState
from hybridssm.mixers.rwkv import RWKVMixer, RWKVState

__all__ = [
    "DeltaNetMixer",
    "DeltaNetState",
    "GatedDeltaNetMixer",
    "GatedSSMMixer",
    "GatedSSMState",
    "Mamba2Mixer",
    "Mamba2State",
    "GRUMixer",
    "GRUState",
    "RGLRUMixer",
    "RGLRUState",
    "RWKVMixer",
    "RWKVState",
    "Mixer",
    "check_mixer_state",
    "finish_state",
    "valid_mask",
]
