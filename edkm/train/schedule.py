"""Learning-rate and tau schedules of the trainer (pure functions of the config and step)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from edkm.preparation import clustered_layers
from edkm.train.config import TrainConfig


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """The LR multiplier per scheduler step: linear warm-up over ``optim.warmup_steps``,
    then ``cosine`` (down to 0.1), ``linear`` (down to 0) or ``constant`` decay."""
    o = config.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        frac = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
        if o.schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if o.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 1.0

    return f


def tau_at(config: TrainConfig, step: int) -> float:
    """tau of step ``step`` (0-based): geometric from ``optim.tau_start`` to ``dkm.tau``."""
    start, end = config.optim.tau_start, config.dkm.tau
    if start is None or config.optim.max_steps <= 1:
        return end
    frac = min(1.0, step / (config.optim.max_steps - 1))
    return start * (end / start) ** frac


def set_tau(model: torch.nn.Module, config: TrainConfig, step: int) -> None:
    """Give every clustered layer the tau of ``step`` (no-op without ``optim.tau_start``)."""
    if config.optim.tau_start is None:
        return
    tau = tau_at(config, step)
    for _, _, p in clustered_layers(model):
        if p.config.tau != tau:
            p.config = p.config.replace(tau=tau)


def rebase_lr(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, config: TrainConfig,
              lr_scale: float) -> float:
    """Point a restored scheduler at ``optim.lr * lr_scale`` and the current schedule, and
    set the optimizer's lr for the next step accordingly.

    Args:
        opt, sched: Optimizer and scheduler after ``load_state_dict``.
        config: The config now in effect (its lr, schedule, warm-up, max_steps).
        lr_scale: Product of the rollback halvings so far (1.0 without rollbacks).
    Returns:
        The lr the next step uses.
    """
    base = config.optim.lr * lr_scale
    f = lr_lambda(config)
    sched.base_lrs = [base for _ in opt.param_groups]
    sched.lr_lambdas = [f for _ in opt.param_groups]
    for g in opt.param_groups:
        g["initial_lr"] = base
        g["lr"] = base * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    return opt.param_groups[0]["lr"]
