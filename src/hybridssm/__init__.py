"""hybridssm: hybrid state-space + attention sequence backbones for PyTorch.

``import hybridssm as hs``; see the README for the API tour and DESIGN for the contract.
"""

from hybridssm import models as _models  # noqa: F401  (registers the models)
from hybridssm.blocks import ParallelBlock, ParallelState, ResidualBlock
from hybridssm.config import ModelConfig
from hybridssm.mixers import GatedSSMMixer, Mamba2Mixer, Mixer
from hybridssm.models import GatedSSM, GatedSSMConfig, Mamba2, Mamba2Config, SequenceModel
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

__version__ = "0.1.0"

__all__ = [
    "GatedSSM",
    "GatedSSMConfig",
    "GatedSSMMixer",
    "Mamba2",
    "Mamba2Config",
    "Mamba2Mixer",
    "Mixer",
    "ModelConfig",
    "ModelState",
    "ParallelBlock",
    "ParallelState",
    "ResidualBlock",
    "SequenceModel",
    "build",
    "get_config_class",
    "kernels",
    "list_models",
    "load",
    "output_size",
    "param_count",
    "recommended_defaults",
    "register_model",
    "use_kernels",
]
