"""The models; importing this package registers each of them."""

from hybridssm.models.base import SequenceModel
from hybridssm.models.gated_ssm import GatedSSM, GatedSSMConfig

__all__ = ["SequenceModel", "GatedSSM", "GatedSSMConfig"]
