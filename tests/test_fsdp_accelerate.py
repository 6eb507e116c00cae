"""DKM under accelerate's FSDP2 plugin (fsdp_version=2, gloo, CPU) trains like one process.

`edkm.prepare`, then `edkm.distributed.prepare_for_fsdp`, then ``accelerator.prepare``
with ``FullyShardedDataParallelPlugin(fsdp_version=2)``: accelerate's own FSDP2 path
shards every decoder layer, the embedding, the tail and the root. Same model, data, steps
and tolerance rule as tests/test_fsdp.py (the direct ``fully_shard_dkm`` path).

accelerate 1.15 keeps ``DistributedType.MULTI_CPU`` on CPU and drops the FSDP plugin (it
wraps the model in DDP instead; checked), so `_fsdp2_accelerator` switches the accelerator
state to FSDP after construction. That is the only test-side step: ``accelerator.prepare``
then runs the same ``_prepare_fsdp2`` / ``fsdp2_prepare_model`` code it runs on GPUs.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_fsdp import LR, _batches, _luts, _model, _train

import edkm
from edkm.distributed import local_batch, prepare_for_fsdp
from edkm.hub.models import tiny_llama

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo file:// rendezvous tested on Linux")

WORLD = 2


def _fsdp2_accelerator():
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    if acc.distributed_type != DistributedType.FSDP:  # CPU: see the module header
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    assert acc.is_fsdp2
    return acc


def _worker(rank, init_file, out_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        acc = _fsdp2_accelerator()
        model = _model(importance=True)
        assert prepare_for_fsdp(model) == 14  # 2 layers x 7 projections
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        model, opt = acc.prepare(model, opt)
        q = model.model.layers[0].self_attn.q_proj.parametrizations.weight
        shards = {"weight": tuple(q.original.to_local().shape), "importance": tuple(q[0].importance.to_local().shape),
                  "layer": type(model.model.layers[0]).__name__}
        losses = []
        for ids in _batches():
            ids = local_batch(ids, WORLD, rank)
            loss = model(input_ids=ids, labels=ids).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(acc.reduce(loss.detach(), reduction="mean").item())
        if rank == 0:
            torch.save({"losses": losses, "luts": _luts(model), "shards": shards}, out_path)
        dist.barrier()  # leave together: see the note in tests/train/test_sharded.py
    finally:
        dist.destroy_process_group()


def test_accelerate_fsdp2_trains_like_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), out_path), nprocs=WORLD, join=True)
        got = torch.load(out_path)
    torch.set_num_threads(1)
    model = _model(importance=True)
    want_losses, _ = _train(model, _batches())
    want_luts = _luts(model)
    assert got["shards"]["layer"] == "FSDPLlamaDecoderLayer"  # accelerate sharded the decoder layers
    assert got["shards"]["weight"] == (32, 64) and got["shards"]["importance"] == (32, 64)  # (64, 64) / 2 ranks
    # The rule of tests/test_fsdp.py: step 0 differs only in fp32 summation order (1e-5
    # relative); after an optimizer step one bf16 ulp (2**-8) for the losses and the LUTs.
    assert abs(got["losses"][0] - want_losses[0]) <= 1e-5 * abs(want_losses[0]), (got["losses"][0], want_losses[0])
    ulp = 2**-8
    for step, (a, b) in enumerate(zip(got["losses"], want_losses)):
        assert abs(a - b) <= ulp * abs(b), f"step {step}: accelerate FSDP2 loss {a:.6f} vs one process {b:.6f}"
    for name, want in want_luts.items():
        err = ((got["luts"][name] - want).abs().max() / want.abs().max()).item()
        assert err < ulp, f"{name}: final LUT differs by {err:.3g} (tolerance {ulp:.1e})"


def test_prepare_for_fsdp_refuses_edkm_sharding():
    model = edkm.prepare(tiny_llama(seed=0), edkm.DKMConfig(bits=3, shard=True))
    with pytest.raises(ValueError, match=r"q_proj' has DKMConfig\(shard=True\).*over 1 ranks"):
        prepare_for_fsdp(model)
