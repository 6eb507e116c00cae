"""The trainer under FSDP2 (``optim.fsdp=true``): accelerator, sharded checkpoints, export.

`edkm.train.loop.train` calls these instead of the single-process pieces when the config
asks for FSDP2:

    accelerator      an accelerate ``Accelerator`` with ``FullyShardedDataParallelPlugin
                     (fsdp_version=2)`` (plain accelerate otherwise)
    shard_ready      `edkm.distributed.prepare_for_fsdp` and the auto-wrap unit (the class
                     of the model's decoder layers), just before ``accelerator.prepare``
    shard_teacher    FSDP2 on the frozen float model too (``kd`` losses, domain report), so
                     no rank holds a whole float copy
    save / load      the run's state as an `edkm.train.sharded` checkpoint, every rank taking
                     part: model and AdamW shards through DCP, each rank's scheduler, guard,
                     counters and RNG states in its own file
    load_weights     the weights of a sharded checkpoint into the live sharded model
    export           gather the full state to rank 0 and export it exactly as ``edkm export``
                     exports a checkpoint in one process (same model build, same bytes)

DKM runs on the all-gathered weight on every rank (`edkm.distributed`), so every forward
pass is collective: evaluation, the domain report and the ``run.domains_every`` curve run
on every rank over the same windows (identical results); only rank 0 writes them.
``optim.mixed_precision`` bf16 / fp16 becomes accelerate's FSDP2 mixed-precision policy
(parameters all-gathered, hence clustered, in that dtype); CPU tests cover ``no`` only.

Launch: FSDP2 needs a process group, so ``optim.fsdp=true`` needs ``torchrun`` or
``accelerate launch``; one process (``--nproc-per-node 1``) is allowed (FSDP2 over one
rank, e.g. a single GPU with NCCL). accelerate (1.15) keeps ``MULTI_CPU`` on CPU and drops
the FSDP plugin (it would wrap the model in DDP), so on CPU the accelerator state is switched
to FSDP after construction, as tests/test_fsdp_accelerate.py does; ``accelerator.prepare``
then runs accelerate's own FSDP2 code path, the one it runs on GPUs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from edkm.distributed import decoder_layers, prepare_for_fsdp
from edkm.train.config import ConfigError, TrainConfig
from edkm.train.guard import DivergenceGuard
from edkm.train.sharded import gather_full_state, load_sharded_checkpoint, save_sharded_checkpoint
from edkm.train.state import TrainState, restore_run_state, run_state

log = logging.getLogger(__name__)


def accelerator(config: TrainConfig) -> Any:
    """The run's ``accelerate.Accelerator``: FSDP2 when ``optim.fsdp``, else plain.

    Returns:
        The accelerator. Raises `ConfigError` for ``optim.fsdp=true`` without a process group
        (plain ``edkm train``, no launcher).
    """
    from accelerate import Accelerator

    o, cpu = config.optim, not torch.cuda.is_available()
    # cpu=True on machines without CUDA: accelerate then sets up multi-CPU (gloo) runs
    # from torchrun / accelerate launch; without it, each CPU rank trains alone.
    if not o.fsdp:
        return Accelerator(gradient_accumulation_steps=o.grad_accum, mixed_precision=o.mixed_precision, cpu=cpu)
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    launched = all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"))  # torchrun's env
    if not launched and not _group():
        raise ConfigError("optim.fsdp=true needs torch.distributed (FSDP2 shards over a process group), and this "
                          f"process has none (WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}): launch with "
                          "`torchrun --nproc-per-node N -m edkm train ...` or `accelerate launch` (N=1 is fine), "
                          "or set optim.fsdp=false")
    if cpu and not _group():  # accelerate makes a gloo group only for WORLD_SIZE > 1 (NCCL: always)
        dist.init_process_group("gloo")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    acc = Accelerator(gradient_accumulation_steps=o.grad_accum, mixed_precision=o.mixed_precision, cpu=cpu,
                      fsdp_plugin=plugin)
    if acc.distributed_type != DistributedType.FSDP:  # CPU (or one process): see the module header
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        if o.mixed_precision != "no":  # what accelerate does when it sets FSDP itself
            plugin.set_mixed_precision(o.mixed_precision)
    if not (acc.is_fsdp2 and _group()):
        raise RuntimeError(f"accelerate did not set up FSDP2 (distributed type {acc.distributed_type}, process group "
                           f"{'present' if _group() else 'missing'})")
    return acc


def shard_ready(acc: Any, model: torch.nn.Module) -> None:
    """Make a prepared model ready for ``acc.prepare`` under FSDP2.

    Runs `edkm.distributed.prepare_for_fsdp` (refuses ``shard=True``, shards the importance
    with the weight) and sets accelerate's auto-wrap unit to the class of the model's
    decoder layers (`edkm.distributed.decoder_layers`).

    Raises:
        ValueError naming the model class when it has no decoder layers holding clustered layers.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"optim.fsdp=true: {type(model).__name__} has no nn.ModuleList of layers holding clustered "
                         "layers to shard one by one (check dkm.min_weight_numel)")
    prepare_for_fsdp(model)
    acc.state.fsdp_plugin.transformer_cls_names_to_wrap = [type(layers[0]).__name__]


def shard_teacher(teacher: torch.nn.Module | None) -> torch.nn.Module | None:
    """Shard the frozen float model with FSDP2 (each decoder layer, then the root), in place.

    Its forward passes (the ``kd`` targets, the domain report) then run on every rank in
    the same order as the student's, and its weights take 1/R of the memory per rank.

    Returns:
        The same teacher (None stays None).
    """
    from torch.distributed.fsdp import fully_shard

    if teacher is None:
        return None
    layers = next((m for m in teacher.modules() if isinstance(m, torch.nn.ModuleList)), [])
    for layer in layers:
        fully_shard(layer)
    fully_shard(teacher)
    return teacher


def save(out: Path, model: torch.nn.Module, opt: Any, sched: Any, ts: TrainState, guard: DivergenceGuard,
         meta: dict[str, Any], keep: int, score: float | None, score_by: str = "ppl") -> Path:
    """Write checkpoint ``ts.step`` of the run as a sharded checkpoint (collective).

    Returns:
        The checkpoint directory (see `edkm.train.sharded.save_sharded_checkpoint`).
    """
    return save_sharded_checkpoint(out, ts.step, model, _torch_optimizer(opt), run_state(sched, ts, guard), meta,
                                   keep=keep, score=score, score_by=score_by)


def load(ckpt: Path, model: torch.nn.Module, opt: Any, sched: Any, guard: DivergenceGuard) -> TrainState:
    """Restore a `save` checkpoint into the sharded model, optimizer, scheduler, guard and
    this rank's RNGs (collective).

    A checkpoint written before the first optimizer step holds no AdamW state (see
    `edkm.train.sharded`): the optimizer's state is then cleared, as a fresh one (a rollback
    to the start of the run).

    Returns:
        The restored counters. Raises `CheckpointError` (every rank) for a corrupt checkpoint
        or another world size.
    """
    extra, manifest = load_sharded_checkpoint(ckpt, model, _torch_optimizer(opt))
    if not manifest.get("optimizer_state", True):
        _torch_optimizer(opt).state.clear()
    return restore_run_state(extra, sched, guard)


def load_weights(ckpt: Path, model: torch.nn.Module, opt: Any) -> None:
    """Load a sharded checkpoint's weights (and AdamW state) into the live run (collective);
    the RNG states and counters stay as they are."""
    load_sharded_checkpoint(ckpt, model, _torch_optimizer(opt))


def export(model: torch.nn.Module, config: TrainConfig, path: Path) -> dict[str, int]:
    """Gather the full state to rank 0 and write the packed export there (collective).

    Rank 0 builds the model as ``edkm export`` does (`edkm.train.data.load_model`, then
    ``edkm.prepare`` with ``config.dkm``), loads the gathered state and exports it, so the
    file equals the one-process export of the same weights byte for byte.

    Returns:
        Sizes in bytes on rank 0 (`edkm.train.steps.export_model`), ``{}`` on the others.
    """
    from edkm.preparation import prepare
    from edkm.train.data import load_model
    from edkm.train.steps import export_model

    full = gather_full_state(model)
    sizes: dict[str, int] = {}
    if dist.get_rank() == 0:
        plain, _ = load_model(config)
        prepare(plain, config.dkm)
        plain.load_state_dict(full)
        sizes = export_model(plain.eval(), path)
    dist.barrier()
    return sizes


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _torch_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt
