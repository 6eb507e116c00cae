"""Crash-safe sharded checkpoints for FSDP2 runs (``torch.distributed.checkpoint``).

A sharded checkpoint is a ``step-000123/`` directory like the single-process ones
(`edkm.train.checkpoint`), holding:

- ``dcp/``: the model (weights with the DKM centroids) and optimizer state, written by every
  rank with ``torch.distributed.checkpoint`` from ``get_state_dict``: each rank writes its
  own shards, replicated tensors (the centroid buffers) once (no optimizer state before
  the first optimizer step: see `_state`);
- ``rank-00000.pt`` ...: one small ``torch.save`` file per rank for what is not sharded and
  may differ per rank (RNG states, counters, data position: the caller's ``extra``);
- ``manifest.json``: step, score, ``meta``, ``"format": "dcp-sharded/1"``, the world size
  and the SHA-256 of every file above.

Every rank writes into one temporary directory (a file system all ranks share), the files
are fsynced, the ranks hash them (each a 1/R of the files) and rank 0 writes the manifest
and publishes the directory exactly as a single-process checkpoint is published (rename,
then ``latest``, keep-best, pruning: `edkm.train.checkpoint.publish`). A kill at any point
leaves the previous checkpoint and ``latest`` intact; `edkm.train.checkpoint.remove_stale_tmp`
clears the leftovers. Loading verifies every digest first (a truncated or corrupt file is a
`CheckpointError` on every rank, never a silent restart), then restores model and
optimizer shards in place with ``set_state_dict``.

Export does not need the ranks: `load_sharded_model` reads the whole checkpoint in one
process into an unsharded prepared model (what ``edkm export`` does with a sharded run
directory); `gather_full_state` gathers the full state to rank 0 inside a live run.
Resuming needs the world size that wrote the checkpoint (the per-rank files), and refuses
another one by name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from edkm.train.checkpoint import (
    MANIFEST,
    SHARDED_FORMAT,
    CheckpointError,
    fsync_file,
    publish,
    read_manifest,
    sha256_file,
    space_note,
)

log = logging.getLogger(__name__)

DCP_DIR = "dcp"


def rank_file(rank: int) -> str:
    """Name of rank ``rank``'s own file in a sharded checkpoint."""
    return f"rank-{rank:05d}.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a checkpoint directory written by `save_sharded_checkpoint`."""
    path = Path(path)
    return (path / MANIFEST).is_file() and read_manifest(path).get("format") == SHARDED_FORMAT


def save_sharded_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            extra: dict[str, Any], meta: dict[str, Any], keep: int = 2,
                            score: float | None = None, score_by: str = "ppl") -> Path:
    """Write checkpoint ``step`` of an FSDP2 run from every rank, atomically (collective).

    Args:
        output_dir: Run directory, on a file system every rank sees.
        step: Optimizer step the state belongs to.
        model: The FSDP2-sharded model (`edkm.distributed.fully_shard_dkm`).
        optimizer: Its optimizer (state sharded like the parameters).
        extra: This rank's other state (RNG states, counters, data position; anything
            ``torch.save`` writes), restored to the same rank by `load_sharded_checkpoint`.
        meta: JSON-able metadata for the manifest (rank 0's is written).
        keep: Number of most recent checkpoints kept (``latest`` and ``best`` always are).
        score: Held-out score (lower is better) or None; a lower finite score moves ``best``.
        score_by: What ``score`` measures (see `edkm.train.checkpoint.save_checkpoint`).
    Returns:
        The checkpoint directory, on every rank. Raises `CheckpointError` on every rank,
        naming the failing rank and path, when any rank's write fails (the previous
        checkpoint stays).
    """
    rank, world = _rank_world()
    root = Path(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{from_rank0(os.getpid())}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _state(model, optimizer)
    failure = None
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / DCP_DIR))
        torch.save(extra, tmp / rank_file(rank))
        fsync_file(tmp / rank_file(rank))
    except (OSError, RuntimeError) as err:  # DCP raises CheckpointException (a RuntimeError) on every rank
        failure = f"rank {rank}: {err}"
    _raise_any(failure, f"could not write sharded checkpoint {tmp} ({space_note(root, _local_bytes(state['model']))}); "
                        "the previous checkpoint is intact", cleanup=tmp)
    digests = _hash_files(tmp, sorted(_files(tmp)), rank, world)
    failure = None
    if rank == 0:
        try:
            manifest = {"step": step, "format": SHARDED_FORMAT, "world_size": world, "sha256": digests,
                        "optimizer_state": "optim" in state, "meta": meta, "score": score, "score_by": score_by}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            fsync_file(tmp / MANIFEST)
            publish(tmp, final, score, keep, score_by)
        except OSError as err:
            failure = f"rank 0: {err}"
    _raise_any(from_rank0(failure), f"could not publish sharded checkpoint {final}; the previous checkpoint is intact",
               cleanup=tmp)
    log.info("sharded checkpoint step %d (%d ranks) -> %s", step, world, final)
    return final


def load_sharded_checkpoint(path: str | Path, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify a sharded checkpoint and restore it into ``model`` and ``optimizer`` (collective).

    Args:
        path: A checkpoint directory written by `save_sharded_checkpoint`.
        model: The FSDP2-sharded model, built and sharded as in the run that saved it.
        optimizer: Its optimizer (empty state is fine: ``get_state_dict`` initialises it).
    Returns:
        ``(extra, manifest)``: this rank's ``extra`` dict as saved, and the manifest.
        Raises `CheckpointError` on every rank when the checkpoint is not sharded, was
        written by another world size, or any file is missing, truncated or corrupt.
    """
    path = Path(path)
    rank, world = _rank_world()
    manifest = read_manifest(path)
    if manifest.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not sharded (format {manifest.get('format')!r}); "
                              "load it with edkm.train.checkpoint.load_checkpoint")
    if manifest.get("world_size") != world:
        raise CheckpointError(f"sharded checkpoint {path} was written by world size {manifest.get('world_size')} and "
                              f"this run has world size {world}: resume with {manifest.get('world_size')} ranks "
                              "(its per-rank RNG and data state cannot be split another way)")
    names = sorted(manifest.get("sha256") or {})
    _raise_any(_verify(path, manifest, names[rank::world]), f"sharded checkpoint {path} failed verification")
    if manifest.get("optimizer_state", True):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path / DCP_DIR)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:  # saved before the first optimizer step: the optimizer stays as built
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=path / DCP_DIR)
        set_model_state_dict(model, model_sd)
    extra = torch.load(path / rank_file(rank), map_location="cpu", weights_only=False)
    return extra, manifest


def load_sharded_model(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the full weights of a sharded checkpoint into an unsharded model, in one process.

    No process group is needed: ``torch.distributed.checkpoint`` reads every rank's shards.
    Every file's digest is verified first.

    Args:
        path: A checkpoint directory written by `save_sharded_checkpoint`.
        model: The model prepared as in the run (``edkm.prepare`` with the run's DKM config),
            not sharded, on CPU.
    Returns:
        The manifest. Raises `CheckpointError` for a corrupt or non-sharded checkpoint.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not sharded (format {manifest.get('format')!r})")
    bad = _verify(path, manifest, sorted(manifest.get("sha256") or {}))
    if bad:
        raise CheckpointError(f"sharded checkpoint {path} failed verification: {bad}")
    state = model.state_dict()
    with warnings.catch_warnings():  # DCP warns that it loads "in a single process": what we ask for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=path / DCP_DIR, no_dist=True)
    model.load_state_dict(state)
    return manifest


def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on rank 0, on CPU; ``{}`` on the other ranks (collective).

    Args:
        model: An FSDP2-sharded model.
    Returns:
        Plain tensors keyed like the unsharded model's ``state_dict`` (importance excluded).
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` for DCP; no ``"optim"`` before the optimizer's first step.

    ``get_state_dict`` initialises an empty optimizer state by running one ``step()`` at lr 0:
    for Adam that counts a step, and the run's first real update would then use the
    second step's bias correction. A checkpoint at step 0 must not change the run, so an
    optimizer without state is left alone (and `load_sharded_checkpoint` leaves it fresh).
    """
    if not optimizer.state:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _rank_world() -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sharded checkpoints need torch.distributed initialised (the FSDP2 run's process group)")
    return dist.get_rank(), dist.get_world_size()


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (collective)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_any(failure: str | None, what: str, cleanup: Path | None = None) -> None:
    """Collective: raise `CheckpointError` on every rank when any rank reports a failure."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failures = [f for f in failures if f]
    if not failures:
        return
    if cleanup is not None and dist.get_rank() == 0:
        shutil.rmtree(cleanup, ignore_errors=True)
    dist.barrier()
    raise CheckpointError(f"{what}: {'; '.join(failures)}")


def _files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def _hash_files(root: Path, names: list[str], rank: int, world: int) -> dict[str, str]:
    """SHA-256 of every file, each rank hashing 1/R of them; the merged dict on every rank."""
    mine = {name: sha256_file(root / name) for name in names[rank::world]}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _verify(path: Path, manifest: dict[str, Any], names: list[str]) -> str | None:
    """None when every named file exists with its manifest digest, else what is wrong."""
    want = manifest.get("sha256") or {}
    if not want:
        return f"{path / MANIFEST} lists no files"
    for name in names:
        f = path / name
        if not f.is_file():
            return f"file {f} is missing"
        got = sha256_file(f)
        if got != want[name]:
            return f"file {f} is corrupt or truncated (sha256 {got[:12]}..., manifest says {want[name][:12]}...)"
    return None


def _local_bytes(state: dict[str, Any]) -> int:
    total = 0
    for v in state.values():
        if isinstance(v, torch.Tensor):
            local = v.to_local() if hasattr(v, "to_local") else v
            total += local.numel() * local.element_size()
    return total
