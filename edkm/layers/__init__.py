"""Layers: the DKM parametrization used in training (`parametrization.py`) and the finalized LUT
layers (`lut.py`)."""

from edkm.layers.lut import LUTEmbedding, LUTLinear
from edkm.layers.parametrization import DKMWeight, clustered_layers, to_points, weight_groups

__all__ = ["DKMWeight", "LUTEmbedding", "LUTLinear", "clustered_layers", "to_points", "weight_groups"]
