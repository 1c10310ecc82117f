"""The models; importing this package registers each of them."""

from hybridssm.models.base import SequenceModel
from hybridssm.models.gated_ssm import GatedSSM, GatedSSMConfig
from hybridssm.models.hybrid import Hybrid, HybridConfig, build_layer, layer_pattern
from hybridssm.models.hymba import Hymba, HymbaConfig
from hybridssm.models.mamba import Mamba, MambaBlock, MambaConfig
from hybridssm.models.mamba2 import Mamba2, Mamba2Config
from hybridssm.models.ss_transformer import SSTransformer, SSTransformerConfig
from hybridssm.models.transformer import Transformer, TransformerConfig

__all__ = [
    "GatedSSM",
    "GatedSSMConfig",
    "Hybrid",
    "HybridConfig",
    "Hymba",
    "HymbaConfig",
    "Mamba",
    "Mamba2",
    "Mamba2Config",
    "MambaBlock",
    "MambaConfig",
    "SSTransformer",
    "SSTransformerConfig",
    "SequenceModel",
    "Transformer",
    "TransformerConfig",
    "build_layer",
    "layer_pattern",
]
