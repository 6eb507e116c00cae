"""prepare() says why nothing was clustered and refuses meta-device weights by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edkm


def test_only_small_layers_says_they_were_too_small():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"all 2 layer\(s\) matching include=\('\*',\) exclude=\(\) have fewer than "
                                         r"min_weight_numel=1024 weights \(largest: '0' with 512\); lower dkm"):
        edkm.prepare(model, edkm.DKMConfig(bits=2))
    with pytest.raises(ValueError, match="no layer matched include=\\('nothing'"):
        edkm.prepare(model, edkm.DKMConfig(bits=2, include=("nothing",)))


def test_meta_device_weight_is_named():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"layer '0' has its weight on the meta device \(shape \(64, 64\)"):
        edkm.prepare(model, edkm.DKMConfig(bits=2))
