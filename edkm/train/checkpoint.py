"""Crash-safe training checkpoints.

A checkpoint is a directory ``step-000123/`` holding ``state.pt`` (model with centroids,
optimizer, scheduler, RNG states, data position) and ``manifest.json`` (config, step, the
held-out score and the SHA-256 of ``state.pt``). It is written under a temporary name,
fsynced, renamed into place, and only then is ``latest`` (a one-line file) replaced
atomically to point at it; ``best`` points at the checkpoint with the lowest held-out
score. A crash or a failed write (disk full) at any moment leaves the previous checkpoint
intact and ``latest`` valid; the failed write's temporary directory is removed, and
`remove_stale_tmp` clears those a killed process left behind. Pruning keeps the newest
``keep`` checkpoints, ``latest`` and ``best``.

Loading verifies the digest: a truncated or corrupt checkpoint raises `CheckpointError`
naming the file, never a silent restart from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"
STATE = "state.pt"
MANIFEST = "manifest.json"
SHARDED_FORMAT = "dcp-sharded/1"  # manifest "format" of edkm.train.sharded checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt, or could not be written."""


def save_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2,
                    score: float | None = None, score_by: str = "ppl") -> Path:
    """Write ``state`` as checkpoint ``step`` atomically and point ``latest`` at it.

    Args:
        output_dir: Run directory.
        step: Optimizer step the state belongs to.
        state: Anything ``torch.save`` can write (tensors, dicts, RNG states).
        meta: JSON-able metadata stored in the manifest (config, data position, ...).
        keep: Number of most recent checkpoints kept on disk (``best`` is kept too).
        score: Held-out score of this state (lower is better), or None. A finite score
            lower than the current best's moves ``best`` here.
        score_by: What ``score`` measures (``ppl``, ``kl`` or ``loss``, `TrainConfig.score_by`),
            stored next to it: scores are only compared with scores of the same kind.
    Returns:
        The checkpoint directory. Raises `CheckpointError` naming the path, the bytes
        needed and the bytes free when the write fails (the previous checkpoint stays).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save(state, tmp / STATE)
        digest = sha256_file(tmp / STATE)
        manifest = {"step": step, "sha256": {STATE: digest}, "meta": meta, "score": score, "score_by": score_by}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for f in (tmp / STATE, tmp / MANIFEST):
            fsync_file(f)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {tmp / STATE}: {err} "
                              f"({space_note(root, _state_bytes(state))}); the previous checkpoint is intact") from err
    publish(tmp, final, score, keep, score_by)
    log.info("checkpoint step %d -> %s%s", step, final, "" if score is None else f" (held-out {score_by} {score:.4g})")
    return final


def publish(tmp: Path, final: Path, score: float | None, keep: int, score_by: str = "ppl") -> None:
    """Move a fully written and fsynced checkpoint directory into place and update the pointers.

    Renames ``tmp`` to ``final`` (replacing an older ``final``), points ``latest`` at it,
    moves ``best`` there when ``score`` is finite and lower than the current best's (or the
    current best was scored by another measure: a run resumed with a new ``run.best_by``), and
    prunes to ``keep`` checkpoints. Shared by the single-process checkpoints and the
    sharded ones (`edkm.train.sharded`), which call it on one rank.

    Args:
        tmp: The temporary directory holding the complete checkpoint (manifest included).
        final: Its ``step-NNNNNN`` name in the run directory.
        score: Held-out score of the state (lower is better), or None.
        keep: Number of most recent checkpoints kept (``latest`` and ``best`` always are).
        score_by: What ``score`` measures (see `save_checkpoint`).
    """
    root = final.parent
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name + "\n")
    if score is not None and math.isfinite(score):
        best = best_checkpoint(root)
        best_score = manifest_score(read_manifest(best), score_by) if best is not None and best != final else None
        if best_score is None or score < best_score:
            _atomic_write(root / BEST, final.name + "\n")
    _prune(root, keep)


def best_checkpoint(output_dir: str | Path) -> Path | None:
    """The directory ``best`` points at (lowest held-out score), or None if none was scored."""
    pointer = Path(output_dir) / BEST
    if not pointer.exists():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    return path if path.is_dir() and path.name.startswith("step-") else None


def manifest_score(manifest: dict[str, Any], score_by: str) -> float | None:
    """A checkpoint manifest's score when it was scored by ``score_by`` (None: unscored, or
    scored by another measure, which a score of this kind cannot be compared with).
    Checkpoints written before ``score_by`` was stored were scored by held-out perplexity."""
    return manifest.get("score") if manifest.get("score_by", "ppl") == score_by else None


def reset_best(output_dir: str | Path) -> None:
    """Forget the ``best`` pointer (a fresh run in a directory an earlier run used)."""
    (Path(output_dir) / BEST).unlink(missing_ok=True)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A checkpoint's manifest without loading its state; `CheckpointError` if unreadable."""
    manifest_path = Path(path) / MANIFEST
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is missing or unreadable: {err}") from err


def remove_stale_tmp(output_dir: str | Path) -> list[Path]:
    """Delete temporary checkpoint directories and pointer files a killed run left behind.

    Only safe while holding the run directory's lock (`edkm.train.lock.RunLock`).

    Returns:
        The removed paths.
    """
    root = Path(output_dir)
    stale = [p for p in root.glob(".tmp-step-*")] + [p for p in root.glob(".*.tmp-*") if p.is_file()]
    for p in stale:
        log.warning("removing stale temporary checkpoint file %s (left by an interrupted run)", p)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


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
    manifest = read_manifest(path)
    if manifest.get("format") == SHARDED_FORMAT:
        raise CheckpointError(f"checkpoint {path} is sharded (written under FSDP2 by {manifest.get('world_size')} ranks): "
                              "load it with edkm.train.sharded.load_sharded_checkpoint (resume) or "
                              "load_sharded_model (one process, e.g. export)")
    try:
        want = manifest["sha256"][STATE]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint manifest {manifest_path} has no sha256 of {STATE}") from err
    state_path = path / STATE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint file {state_path} is missing")
    got = sha256_file(state_path)
    if got != want:
        raise CheckpointError(
            f"checkpoint file {state_path} is corrupt or truncated (sha256 {got[:12]}..., manifest says {want[:12]}...)"
        )
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    return state, manifest


def _state_bytes(state: Any) -> int:
    """Tensor bytes in a nested state (what ``torch.save`` must write, roughly)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def space_note(root: Path, need: int) -> str:
    """Disk-space note for a failed write: 'needs about N bytes, F free on the device of
    ``root``' (and 'no space left' when short)."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return f"needs about {need} bytes"
    note = f"needs about {need} bytes, {free} bytes free on the device of {root}"
    return note + ("; no space left on the device" if free < need else "")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (``os.fsync``)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` highest steps (by number: names grow past 6 digits),
    never the ones ``latest`` or ``best`` name."""
    ckpts = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    pinned = {(root / name).read_text().strip() for name in (LATEST, BEST) if (root / name).exists()}
    for old in ckpts[:-keep]:
        if old.name not in pinned:
            shutil.rmtree(old, ignore_errors=True)
