"""What a training step carries from one step to the next, and the process RNG states.

`TrainState` is the counters of a run (optimizer step, micro-batches consumed, rollbacks,
the lr scale they left); `snapshot` packs it with the model, optimizer, scheduler, guard
and RNG states into the dict a checkpoint stores, and `restore` loads such a dict back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edkm.train.guard import DivergenceGuard


@dataclass
class TrainState:
    """Counters of a run.

    Args:
        step: Optimizer steps done. micro: Micro-batches consumed (the data position).
        rollbacks: Divergence rollbacks so far. lr_scale: 0.5 ** rollbacks.
    """

    step: int = 0
    micro: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, state: TrainState,
             guard: DivergenceGuard) -> dict[str, Any]:
    """Everything a checkpoint needs to continue bitwise: weights, optimizer, scheduler,
    counters, the guard's loss history and all RNG states."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), **run_state(sched, state, guard)}


def run_state(sched: Any, state: TrainState, guard: DivergenceGuard) -> dict[str, Any]:
    """The part of a `snapshot` besides weights and optimizer: scheduler, counters, the
    guard's history and this process's RNG states (a sharded checkpoint's per-rank file)."""
    return {"scheduler": sched.state_dict(), "step": state.step, "micro": state.micro, "rollbacks": state.rollbacks,
            "lr_scale": state.lr_scale, "guard": guard.state_dict(), "rng": get_rng()}


def restore(saved: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
            guard: DivergenceGuard) -> TrainState:
    """Load a `snapshot` dict into ``model`` / ``opt`` / ``sched`` / ``guard`` and the RNGs.

    Returns:
        The restored counters (checkpoints written before rollbacks existed: 0 and 1.0).
    """
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    return restore_run_state(saved, sched, guard)


def restore_run_state(saved: dict[str, Any], sched: Any, guard: DivergenceGuard) -> TrainState:
    """Load a `run_state` dict into ``sched`` / ``guard`` and the RNGs; returns the counters."""
    sched.load_state_dict(saved["scheduler"])
    guard.load_state_dict(saved.get("guard"))
    set_rng(saved["rng"])
    return TrainState(step=saved["step"], micro=saved["micro"], rollbacks=saved.get("rollbacks", 0),
                      lr_scale=saved.get("lr_scale", 1.0))


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng() -> dict[str, Any]:
    """All RNG states of this process (CUDA too when present)."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng(rng: dict[str, Any]) -> None:
    """Inverse of `get_rng`."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
