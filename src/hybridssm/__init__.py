"""hybridssm: hybrid state-space + attention sequence backbones for PyTorch.

``import hybridssm as hs``; see the README for the API tour and DESIGN for the contract.
"""

from hybridssm.backbones import list_backbones, register_backbone
from hybridssm.blocks import ParallelBlock, ParallelState, ResidualBlock
from hybridssm.config import ModelConfig
from hybridssm.convert import from_transformers
from hybridssm.export import export_step, forward_program, step_program
from hybridssm.mixers import (
    AttentionMixer,
    CausalConv1d,
    DeltaNetMixer,
    GatedDeltaNetMixer,
    GatedSSMMixer,
    GRUMixer,
    Mamba2Mixer,
    MambaMixer,
    Mixer,
    RGLRUMixer,
    RWKVMixer,
    SelectiveSSM,
)
from hybridssm.models import (
    GatedSSM,
    GatedSSMConfig,
    Hybrid,
    HybridConfig,
    Hymba,
    HymbaConfig,
    Mamba,
    Mamba2,
    Mamba2Config,
    MambaBlock,
    MambaConfig,
    SequenceModel,
    SSTransformer,
    SSTransformerConfig,
    Transformer,
    TransformerConfig,
    build_layer,
    layer_pattern,
)
from hybridssm.ops._kernels import kernels, use_kernels
from hybridssm.registry import (
    build,
    get_config_class,
    list_models,
    load,
    output_size,
    param_count,
    recommended_defaults,
    register_model,
)
from hybridssm.state import ModelState
from hybridssm.tasks import register_task

__version__ = "0.1.0"

__all__ = [
    "from_transformers",
    "AttentionMixer",
    "CausalConv1d",
    "DeltaNetMixer",
    "GRUMixer",
    "GatedDeltaNetMixer",
    "GatedSSM",
    "GatedSSMConfig",
    "GatedSSMMixer",
    "Hybrid",
    "HybridConfig",
    "Hymba",
    "HymbaConfig",
    "Mamba",
    "Mamba2",
    "Mamba2Config",
    "Mamba2Mixer",
    "MambaBlock",
    "MambaConfig",
    "MambaMixer",
    "Mixer",
    "ModelConfig",
    "ModelState",
    "ParallelBlock",
    "ParallelState",
    "RGLRUMixer",
    "RWKVMixer",
    "ResidualBlock",
    "SSTransformer",
    "SSTransformerConfig",
    "SelectiveSSM",
    "SequenceModel",
    "Transformer",
    "TransformerConfig",
    "build",
    "build_layer",
    "export_step",
    "forward_program",
    "get_config_class",
    "kernels",
    "layer_pattern",
    "list_backbones",
    "list_models",
    "load",
    "output_size",
    "param_count",
    "recommended_defaults",
    "register_backbone",
    "register_model",
    "register_task",
    "step_program",
    "use_kernels",
]
