"""Layers: the DKM parametrization used in training (`parametrization.py`) and the finalized LUT
layers (`lut.py`)."""

from edkm.layers.parametrization import DKMWeight, to_points, weight_groups
from edkm.layers.lut import LUTEmbedding, LUTLinear

__all__ = ["DKMWeight", "LUTEmbedding", "LUTLinear", "to_points", "weight_groups"]
