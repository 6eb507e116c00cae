"""What may change between a checkpoint and ``--resume``, and what may not.

The resumed run compares its config with the checkpoint's (defaults filled in for keys
older checkpoints lack). Keys that only steer the rest of the run are *applied*:
``optim.lr`` / ``max_steps`` / ``schedule`` / ``warmup_steps`` re-base the scheduler
(`edkm.train.schedule.rebase_lr`), ``optim.weight_decay`` is set on the optimizer,
``optim.grad_clip`` / ``tau_start`` and ``run.*`` (but ``run.seed``) are read each step;
``data.eval_domains`` only changes what the final report scores.
Every other difference (the model, the data and its source, the loss and its temperature
and weight, the clustering, batch size, accumulation, autocast, ``optim.fsdp``, seed, number
of processes) would make the checkpoint mean something else: the resume is refused with one message
listing every changed key. A checkpoint written before ``optim.loss`` existed trained on
cross-entropy, so it reads as ``optim.loss=ce`` (not today's default ``kd``); one written
before ``run.best_by`` existed scored checkpoints by perplexity (``run.best_by=ppl``).
"""

from __future__ import annotations

import logging
from typing import Any

from edkm.train.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

APPLIED_OPTIM = ("lr", "max_steps", "schedule", "warmup_steps", "weight_decay", "grad_clip", "tau_start")
SCHEDULE_KEYS = ("optim.lr", "optim.max_steps", "optim.schedule", "optim.warmup_steps")
APPLIED_DATA = ("eval_domains",)
# What a checkpoint that lacks a key ran with, where that differs from today's default.
LEGACY = {("optim", "loss"): "ce", ("run", "best_by"): "ppl"}


def config_changes(meta: dict[str, Any], config: TrainConfig, world: int) -> dict[str, tuple[Any, Any]]:
    """The keys that differ from the checkpoint and can be applied.

    Args:
        meta: The checkpoint manifest's ``meta`` (``config``, ``world_size``).
        config: The config of the resuming run.
        world: Number of processes now.
    Returns:
        ``{"section.key": (old, new)}`` of applicable changes. Raises `ConfigError`
        listing every change that cannot be applied.
    """
    saved_tree = {k: dict(v) if isinstance(v, dict) else v for k, v in meta["config"].items()}
    for (section, key), value in LEGACY.items():
        if isinstance(saved_tree.get(section), dict):
            saved_tree[section].setdefault(key, value)
    saved = _flat(TrainConfig.from_dict(saved_tree, source="checkpoint manifest").to_dict())
    now = _flat(config.to_dict())
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    refused = {k: v for k, v in changed.items() if not _applicable(k)}
    if meta.get("world_size", world) != world:
        refused["processes"] = (meta["world_size"], world)
    if refused:
        listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in refused.items())
        raise ConfigError(f"--resume: the config differs from the checkpoint's in keys that cannot change mid-run: "
                          f"{listed}; resume with the checkpoint's values, or start a new run in another --output-dir")
    return {k: v for k, v in changed.items() if k != "run.output_dir"}


def _applicable(key: str) -> bool:
    section, _, name = key.partition(".")
    if section == "optim":
        return name in APPLIED_OPTIM
    if section == "run":
        return name != "seed"
    if section == "data":
        return name in APPLIED_DATA
    return section == "lowrank"  # only `edkm lowrank` reads it


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, values in tree.items():
        for key, value in (values or {}).items():
            out[f"{section}.{key}"] = value
    return out
