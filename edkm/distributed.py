"""DKM inside FSDP2 (``torch.distributed.fsdp.fully_shard``), at the preparation layer.

Placement: DKM runs on the **all-gathered weight on every rank**. FSDP2 keeps each
parameter as a dim-0 shard (a DTensor) and, in a module's pre-forward, all-gathers it and
swaps the unsharded tensor into ``parametrizations.weight.original``; the `DKMWeight`
parametrization is evaluated when the layer reads ``.weight`` inside that forward, so it
sees the full (out, in) weight (checked by tests/test_fsdp.py). Every rank then runs the
same DKM on bitwise-identical inputs, so the centroid buffers stay identical without any
collective, and the weight gradient each rank produces is J^T G_r for its own upstream
gradient G_r; FSDP2's reduce-scatter averages them into the gradient of the global mean
loss, exactly as one process on the whole batch (DKM's backward is linear in G at a fixed
weight). The table work is replicated (R ranks do the same U x K passes); the weight's
(N,) memory is transient per layer, as FSDP2 frees it after the layer's forward and
gathers it again for its backward. The alternative placement (DKM on each rank's own
shard with all-reduced centroid sums, `edkm.functional.shard`'s idea on FSDP's shards) is
not built: `DKMConfig(shard=True)` is refused under FSDP (it would split the already
gathered weight a second time, over the same ranks).

Per-weight state is sharded like the weight: `shard_importance` turns each importance
buffer (bf16, 2 bytes per weight) into a frozen parameter shaped (out, in / d), which
FSDP2 shards on dim 0 and all-gathers with the weight; it stays out of ``state_dict`` as
the buffer did. A model prepared with importance and sharded by a direct `fully_shard`
call, without `shard_importance`, is refused at its first forward (`check_fsdp`, run by
the forward pre-hook that `edkm.prepare` installs): the buffer would be replicated.

    edkm.prepare(model, config, importance=imp)
    edkm.distributed.fully_shard_dkm(model)   # shard_importance + fully_shard per layer + root

With accelerate (``FullyShardedDataParallelPlugin(fsdp_version=2)``) call
`prepare_for_fsdp` between ``edkm.prepare`` and ``accelerator.prepare``; accelerate then
shards each decoder layer, the embedding and the tail itself (tests/test_fsdp_accelerate.py).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edkm.layers import clustered_layers

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover - older torch: FSDP2 unavailable
    FSDPModule, fully_shard = None, None

log = logging.getLogger(__name__)

IMPORTANCE = "importance"


def fsdp_active(model: nn.Module) -> bool:
    """True when ``model`` or any submodule has been sharded with FSDP2 ``fully_shard``."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def check_fsdp(model: nn.Module) -> None:
    """Refuse DKM settings that FSDP2 cannot run correctly or economically.

    A no-op unless ``model`` holds an FSDP2 module. Raises ``ValueError`` naming the layer
    when a clustered layer has ``DKMConfig(shard=True)`` (eDKM data-parallel sharding of a
    weight FSDP already gathers) or an importance tensor that is a replicated buffer
    rather than a sharded parameter (call `shard_importance` before ``fully_shard``).
    """
    if not fsdp_active(model):
        return
    for name, _, param in clustered_layers(model):
        if param.config.shard:
            raise ValueError(
                f"layer {name!r} has DKMConfig(shard=True) under FSDP2: FSDP already shards the weight and "
                "DKM runs on its all-gathered copy; prepare with shard=False")
        imp = getattr(param, IMPORTANCE, None)
        if imp is not None and not isinstance(imp, nn.Parameter):
            raise ValueError(
                f"layer {name!r} holds its importance as a replicated buffer of {imp.numel() * imp.element_size():,} "
                f"bytes per rank under FSDP2; call edkm.distributed.prepare_for_fsdp(model) before fully_shard or "
                "accelerator.prepare (or use edkm.distributed.fully_shard_dkm)")


def guard_hook(module: nn.Module, args) -> None:
    """Forward pre-hook installed by `edkm.prepare` on the prepared model: runs `check_fsdp`."""
    check_fsdp(module)


def shard_importance(model: nn.Module) -> int:
    """Make every importance buffer of ``model`` a frozen parameter FSDP2 shards like the weight.

    Each (G, N) bf16 buffer becomes an ``nn.Parameter(requires_grad=False)`` of shape
    (out, in / d) (same values, row-major, so `DKMWeight` reads it back as (G, N)); FSDP2
    then shards it on dim 0 and all-gathers it with the layer's weight. It is kept out of
    ``state_dict`` (and not required by ``load_state_dict``), as the buffer was. Call it
    before ``fully_shard``; optimizers built from parameters with ``requires_grad`` skip it.

    Args:
        model: A model prepared by `edkm.prepare`, not yet sharded.
    Returns:
        How many importance tensors were converted (0 if none, or already converted).
    """
    if fsdp_active(model):
        raise ValueError("shard_importance must run before fully_shard (the model already holds FSDP2 modules)")
    done = 0
    for _, module, param in clustered_layers(model):
        imp = param._buffers.get(IMPORTANCE)
        if imp is None:
            continue
        out_features = module.parametrizations.weight.original.shape[0]
        del param._buffers[IMPORTANCE]
        param.register_parameter(IMPORTANCE, nn.Parameter(imp.reshape(out_features, -1), requires_grad=False))
        param.register_state_dict_post_hook(_drop_importance)
        param.register_load_state_dict_post_hook(_allow_missing_importance)
        done += 1
    log.info("importance of %d clustered layer(s) made a sharded (frozen) parameter", done)
    return done


def _drop_importance(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict.pop(prefix + IMPORTANCE, None)


def _allow_missing_importance(module: nn.Module, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.endswith("." + IMPORTANCE)
                                    and k != IMPORTANCE]


def prepare_for_fsdp(model: nn.Module) -> int:
    """What a prepared model needs before any FSDP2 wrapper shards it: call it between
    `edkm.prepare` and ``accelerator.prepare`` (accelerate's FSDP plugin, fsdp_version=2)
    or your own ``fully_shard`` calls. `fully_shard_dkm` calls it itself.

    Refuses ``DKMConfig(shard=True)`` (eDKM's data-parallel sharding would split the weight
    FSDP already gathers, a second time over the same ranks) and runs `shard_importance`, so
    the importance (2 bytes per weight) is sharded with the weight instead of replicated.

    Args:
        model: A model prepared by `edkm.prepare`, not yet sharded.
    Returns:
        The number of importance tensors made shardable (see `shard_importance`).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for name, _, param in clustered_layers(model):
        if param.config.shard:
            raise ValueError(f"layer {name!r} has DKMConfig(shard=True), which FSDP2 does not take: FSDP already "
                             f"shards the weight over {world} ranks; prepare with shard=False")
    return shard_importance(model)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules `fully_shard_dkm` shards one by one: each entry of the first
    ``nn.ModuleList`` that holds clustered layers (a Hugging Face model's ``model.layers``)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(
                any(parametrize.is_parametrized(m, "weight") for m in child.modules()) for child in module):
            return list(module)
    return []


def fully_shard_dkm(model: nn.Module, *, mesh=None, layers: Iterable[nn.Module] | None = None,
                    **fsdp_kwargs) -> nn.Module:
    """Shard a model prepared by `edkm.prepare` with FSDP2 (in place).

    Runs `prepare_for_fsdp`, then ``fully_shard`` on every decoder layer and on the root,
    then `check_fsdp`. DKM runs on the all-gathered weight (module header).

    Args:
        model: The prepared model, on its device, with torch.distributed initialised.
        mesh: FSDP2 device mesh (None = all ranks of the default group).
        layers: Modules sharded before the root (default `decoder_layers`).
        fsdp_kwargs: Passed to ``fully_shard`` (``reshard_after_forward``, ``mp_policy``, ...).
    Returns:
        The same model (its class now an FSDP2 subclass).
    """
    if fully_shard is None:
        raise RuntimeError(f"FSDP2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard), found {torch.__version__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fully_shard_dkm needs torch.distributed initialised (torchrun or init_process_group)")
    prepare_for_fsdp(model)
    for layer in (decoder_layers(model) if layers is None else layers):
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    check_fsdp(model)
    return model


def local_batch(batch: Tensor, world: int, rank: int) -> Tensor:
    """Rank ``rank``'s rows of a global batch split into ``world`` equal parts.

    Equal parts are what make FSDP2's averaged gradient equal the one-process gradient of
    the global mean loss; an uneven split would weight some rows more.

    Args:
        batch: (B, ...) global batch.
        world: Number of ranks; must divide B.
        rank: This rank, 0 <= rank < world.
    Returns:
        ``batch[rank * B / world : (rank + 1) * B / world]``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}")
    if batch.shape[0] % world:
        raise ValueError(f"world size {world} does not divide the global batch of {batch.shape[0]} rows; "
                         f"use a batch size that is a multiple of {world}")
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]
