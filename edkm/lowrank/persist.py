"""Save and reload a LoRD-decomposed model, so `edkm train` can cluster it afterwards.

A decomposed model is a directory:

    lowrank.json   format, the base model section of the trainer config, and the units
                   (member layer names, kept rank; the first member owns the shared A)
    model.pt       the decomposed model's state_dict (factors and everything else)

`load_lowrank` rebuilds the structure on a freshly loaded base model (empty factors of
the recorded ranks, group members sharing their owner's ``down``) and loads the weights,
so no pickled module classes are involved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.lowrank.layers import LowRankLinear

FORMAT = 1
MANIFEST = "lowrank.json"


def lowrank_units(model: nn.Module) -> list[dict[str, Any]]:
    """The decomposed units of ``model``: ``{"members": [owner, sharers...], "rank": r}``."""
    modules = {m: n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    units: dict[int, dict[str, Any]] = {}
    for m, name in modules.items():
        owner = m if not m.shares_down else m._source
        unit = units.setdefault(id(owner), {"members": [modules[owner]], "rank": owner.rank})
        if m is not owner:
            unit["members"].append(name)
    return list(units.values())


def apply_structure(model: nn.Module, units: list[dict[str, Any]]) -> nn.Module:
    """Replace the members of every unit by empty `LowRankLinear` factors of its rank."""
    for unit in units:
        members, rank = unit["members"], int(unit["rank"])
        owner: LowRankLinear | None = None
        for name in members:
            lin = model.get_submodule(name)
            up = nn.Linear(rank, lin.out_features, bias=lin.bias is not None, dtype=lin.weight.dtype)
            if owner is None:
                down = nn.Linear(lin.in_features, rank, bias=False, dtype=lin.weight.dtype)
                new = owner = LowRankLinear(down, up)
            else:
                new = LowRankLinear(None, up, source=owner, source_name=members[0])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def save_lowrank(model: nn.Module, base: dict[str, Any], path: str | Path) -> Path:
    """Write a decomposed model directory (atomically: a temp dir renamed into place).

    Args:
        model: The model after `lowrank_model`.
        base: How to load the dense base model again (the trainer's ``model`` section).
        path: Output directory (must not exist).
    Returns:
        The directory.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{str(path)!r} exists; choose a new output directory")
    units = lowrank_units(model)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "base": base, "units": units}, indent=1))
    os.replace(tmp, path)
    return path


def is_lowrank_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by `save_lowrank`."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a decomposed model directory (format checked)."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported lowrank format {manifest.get('format')!r} (want {FORMAT})")
    return manifest


def load_lowrank(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Rebuild the decomposition on ``base_model`` (in place) and load the saved weights.

    Args:
        path: Directory from `save_lowrank`.
        base_model: The dense model the decomposition started from (same architecture).
    Returns:
        The model, with `LowRankLinear` layers.
    """
    apply_structure(base_model, read_manifest(path)["units"])
    state = torch.load(Path(path) / "model.pt", map_location="cpu", weights_only=True)
    base_model.load_state_dict(state)
    return base_model
