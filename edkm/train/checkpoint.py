"""Crash-safe training checkpoints.

A checkpoint is a directory ``step-000123/`` holding ``state.pt`` (model with centroids,
optimizer, scheduler, RNG states, data position) and ``manifest.json`` (config, step and
the SHA-256 of ``state.pt``). It is written under a temporary name, fsynced, renamed into
place, and only then is ``latest`` (a one-line file) replaced atomically to point at it.
A crash at any moment leaves the previous checkpoint intact and ``latest`` valid.

Loading verifies the digest: a truncated or corrupt checkpoint raises `CheckpointError`
naming the file, never a silent restart from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LATEST = "latest"
STATE = "state.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt."""


def save_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``step`` atomically and point ``latest`` at it.

    Args:
        output_dir: Run directory.
        step: Optimizer step the state belongs to.
        state: Anything ``torch.save`` can write (tensors, dicts, RNG states).
        meta: JSON-able metadata stored in the manifest (config, data position, ...).
        keep: Number of most recent checkpoints kept on disk.
    Returns:
        The checkpoint directory.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE)
    digest = _sha256(tmp / STATE)
    manifest = {"step": step, "sha256": {STATE: digest}, "meta": meta}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for f in (tmp / STATE, tmp / MANIFEST):
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name + "\n")
    _prune(root, keep)
    log.info("checkpoint step %d -> %s", step, final)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The directory ``latest`` points at, or None if the run has no checkpoint yet."""
    pointer = Path(output_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = Path(output_dir) / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{pointer} points at {name!r}, which is not a checkpoint directory")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load and verify a checkpoint directory.

    Returns:
        ``(state, manifest)``. Raises `CheckpointError` on any missing, truncated or
        corrupt file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        want = manifest["sha256"][STATE]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is missing or unreadable: {err}") from err
    state_path = path / STATE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint file {state_path} is missing")
    got = _sha256(state_path)
    if got != want:
        raise CheckpointError(
            f"checkpoint file {state_path} is corrupt or truncated (sha256 {got[:12]}..., manifest says {want[:12]}...)"
        )
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    return state, manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` highest steps (by number: names grow past 6 digits),
    never the one ``latest`` names."""
    ckpts = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    pointer = root / LATEST
    current = pointer.read_text().strip() if pointer.exists() else None
    for old in ckpts[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
