"""The models; importing this package registers each of them."""

from hybridssm.models.base import SequenceModel
from hybridssm.models.gated_ssm import GatedSSM, GatedSSMConfig
from hybridssm.models.mamba2 import Mamba2, Mamba2Config

__all__ = ["SequenceModel", "GatedSSM", "GatedSSMConfig", "Mamba2", "Mamba2Config"]
