"""The modules that surgery puts into a model."""

from tnsurgery.layers.base import SurgeryLayer
from tnsurgery.layers.lowrank import LowRankConv2d, LowRankLinear

__all__ = ["LowRankConv2d", "LowRankLinear", "SurgeryLayer"]
