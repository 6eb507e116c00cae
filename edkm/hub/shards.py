"""Resumable on-disk caches of teacher outputs: a manifest keyed by settings, plus safetensors shards.

A cache directory holds ``manifest.json`` (the settings that produced it, including a
fingerprint of the model) and shards ``shard-00000.safetensors``, ... Each shard is written
to a temporary file and renamed into place, so a crash leaves only whole shards; a rerun
with the same settings skips the shards already there. A directory whose manifest names
other settings is never mixed into: `open_cache` raises and names the first differing key.

`model_fingerprint` identifies a model's weights cheaply (names, shapes, dtypes and a
strided sample of every tensor's values), so a cache built from another checkpoint is not
silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["model_fingerprint", "settings_key", "open_cache", "shard_path", "write_shard", "read_shard"]

MANIFEST = "manifest.json"
_SAMPLE = 4096  # values sampled per tensor: enough to tell checkpoints apart, cheap for 7B models


def model_fingerprint(model: nn.Module) -> str:
    """A hex digest of a model's state: every tensor's name, shape, dtype and ~4k sampled values.

    Args:
        model: any module.

    Returns:
        32 hex characters; equal for equal weights, different when any sampled value differs.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.float64 if t.is_floating_point() else torch.int64)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def settings_key(settings: dict[str, Any]) -> str:
    """16 hex characters identifying a JSON-serialisable settings dict (key order ignored)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def open_cache(directory: str | Path, settings: dict[str, Any]) -> Path:
    """Create ``directory`` with a manifest of ``settings``, or check an existing one matches.

    Args:
        directory: the cache directory.
        settings: JSON-serialisable settings that determine the shards' contents.

    Returns:
        The directory as a Path.

    Raises:
        ValueError: the directory holds a manifest of other settings (names the key and both values).
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / MANIFEST
    want = json.loads(json.dumps(settings))  # normalise tuples to lists
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if have != want:
            key = next(k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
            raise ValueError(f"cache {str(directory)!r} was built with {key}={have.get(key)!r}, "
                             f"not {want.get(key)!r}: use another directory or delete it")
        return directory
    tmp = manifest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(want, indent=1, sort_keys=True))
    os.replace(tmp, manifest)
    return directory


def shard_path(directory: Path, index: int) -> Path:
    """Path of shard ``index`` in a cache directory."""
    return directory / f"shard-{index:05d}.safetensors"


def write_shard(directory: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one shard atomically (temporary file, then rename)."""
    final = shard_path(directory, index)
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, final)


def read_shard(directory: Path, index: int) -> dict[str, torch.Tensor]:
    """Read one shard (CPU tensors). Raises FileNotFoundError naming the path if it is missing."""
    path = shard_path(directory, index)
    if not path.is_file():
        raise FileNotFoundError(f"cache shard {str(path)!r} is missing: rerun the precompute")
    return load_file(str(path))
