"""Sequence mixers: modules that own parameters and a streaming state (DESIGN §3)."""

from hybridssm.mixers.attention import AttentionMixer, AttentionState
from hybridssm.mixers.base import Mixer, check_mixer_state, finish_state, valid_mask
from hybridssm.mixers.conv import CausalConv1d
from hybridssm.mixers.delta_net import DeltaNetMixer, DeltaNetState
from hybridssm.mixers.gated_delta_net import GatedDeltaNetMixer
from hybridssm.mixers.gated_ssm import GatedSSMMixer, GatedSSMState
from hybridssm.mixers.gru import GRUMixer, GRUState
from hybridssm.mixers.mamba import MambaMixer, MambaState, SelectiveSSM
from hybridssm.mixers.mamba2 import Mamba2Mixer, Mamba2State
from hybridssm.mixers.rglru import RGLRUMixer, RGLRUState
from hybridssm.mixers.rwkv import RWKVMixer, RWKVState

__all__ = [
    "AttentionMixer",
    "AttentionState",
    "CausalConv1d",
    "DeltaNetMixer",
    "DeltaNetState",
    "GRUMixer",
    "GRUState",
    "GatedDeltaNetMixer",
    "GatedSSMMixer",
    "GatedSSMState",
    "Mamba2Mixer",
    "Mamba2State",
    "MambaMixer",
    "MambaState",
    "Mixer",
    "RGLRUMixer",
    "RGLRUState",
    "RWKVMixer",
    "RWKVState",
    "SelectiveSSM",
    "check_mixer_state",
    "finish_state",
    "valid_mask",
]
