"""DKM under FSDP2 (gloo, CPU) trains like one process: same loss curve, same final LUTs.

Each rank holds the same random tiny LLaMA, prepared by `edkm.prepare` and sharded by
`edkm.distributed.fully_shard_dkm`, and trains on its 1/R of every global batch; the
one-process run trains on the whole batch. DKM runs on the all-gathered weight (see
`edkm.distributed`), so the only differences are fp32 summation orders: the batch split
of the loss and gradient sums, and FSDP2's reduce-scatter average.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import edkm
from edkm.distributed import check_fsdp, fully_shard_dkm, local_batch, shard_importance
from edkm.hub.models import tiny_llama

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo file:// rendezvous tested on Linux")

STEPS, BATCH, SEQ = 3, 6, 32  # 6 rows divide by 2 and 3 ranks
LR = 1e-3
CFG = dict(bits=3, granularity="per_grouped_channel", group_size=16, cluster_dtype="bfloat16")


def _model(importance: bool):
    model = tiny_llama(seed=0)
    model.train()
    imp = None
    if importance:
        gen = torch.Generator().manual_seed(7)
        imp = {name: torch.rand(m.weight.shape, generator=gen) for name, m in
               edkm.preparation.selected_layers(model, edkm.DKMConfig(**CFG))}
    return edkm.prepare(model, edkm.DKMConfig(**CFG), importance=imp)


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def _luts(model) -> dict[str, torch.Tensor]:
    return {name: p.centroids.clone() for name, _, p in edkm.clustered_layers(model)}


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, module, _ in edkm.clustered_layers(model):
        g = module.parametrizations.weight.original.grad
        out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    return out


def _train(model, batches, world=1, rank=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, first_grads = [], None
    for ids in batches:
        ids = local_batch(ids, world, rank)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        first_grads = _grads(model) if first_grads is None else first_grads
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses, first_grads


def _worker(rank, world, init_file, importance, out_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = fully_shard_dkm(_model(importance))
        q = model.model.layers[0].self_attn.q_proj
        shards = {"weight": tuple(q.parametrizations.weight.original.to_local().shape)}
        if importance:
            shards["importance"] = tuple(q.parametrizations.weight[0].importance.to_local().shape)
        losses, grads = _train(model, _batches(), world, rank)
        if rank == 0:
            torch.save({"losses": losses, "grads": grads, "luts": _luts(model), "shards": shards}, out_path)
        dist.barrier()  # leave together: see the note in tests/train/test_sharded.py
    finally:
        dist.destroy_process_group()


def _spawn(world, importance):
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_path = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(world, init_file, importance, out_path), nprocs=world, join=True)
        return torch.load(out_path)


@pytest.mark.parametrize("world,importance", [(2, False), (3, False), (2, True)])
def test_fsdp_trains_like_one_process(world, importance):
    got = _spawn(world, importance)
    torch.set_num_threads(1)
    model = _model(importance)
    want_losses, want_grads = _train(model, _batches())
    want_luts = _luts(model)
    rows = 64  # tiny_llama's q_proj is (64, 64): FSDP2 keeps ceil(64 / R) rows per rank
    assert got["shards"]["weight"] == (-(-rows // world), 64)
    if importance:  # sharded like the weight, not replicated
        assert got["shards"]["importance"] == got["shards"]["weight"]
    # Rule. Step 0 sees identical weights, so its loss and weight gradients differ only in
    # fp32 summation order: 1e-5 relative (normwise for gradients), as in
    # tests/functional/test_shard.py. After an optimizer step a master weight may land on
    # the other side of a bf16 rounding boundary in one run only, so its clustered copy
    # moves by one bf16 ulp (2**-8 relative); later losses and the LUTs, which are means
    # over many weights, must stay within that one ulp.
    assert abs(got["losses"][0] - want_losses[0]) <= 1e-5 * abs(want_losses[0]), (got["losses"][0], want_losses[0])
    # The weight gradient leaves DKM through the bf16 clustered copy, so it is bf16-rounded
    # (2**-8 relative at most, before and after the DKM backward): per rank under FSDP,
    # once for the whole batch in one process. Normwise (max-normalised) that allows
    # 2**-8 * (max_r max|g_r| + max|g|) / max|g|, with g_r the gradient of rank r's rows.
    per_rank = [_train(_model(importance), [local_batch(_batches()[0], world, r)])[1] for r in range(world)]
    for name, want in want_grads.items():
        scale = want.abs().max()
        tol = 2**-8 * (max(g[name].abs().max() for g in per_rank) + scale) / scale
        err = ((got["grads"][name] - want).abs().max() / scale).item()
        assert err <= tol, f"{name}: step-0 weight gradient differs by {err:.3g} (tolerance {tol:.3g})"
    ulp = 2**-8
    for step, (a, b) in enumerate(zip(got["losses"], want_losses)):
        assert abs(a - b) <= ulp * abs(b), f"step {step}: FSDP loss {a:.6f} vs one process {b:.6f}"
    for name, want in want_luts.items():
        err = ((got["luts"][name] - want).abs().max() / want.abs().max()).item()
        assert err < ulp, f"{name}: final LUT differs by {err:.3g} (tolerance {ulp:.1e})"


@pytest.fixture
def one_rank(tmp_path):
    """A world of one gloo rank in this process (FSDP2 needs an initialised group)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_refuses_edkm_sharding(one_rank):
    model = tiny_llama(seed=0)
    edkm.prepare(model, edkm.DKMConfig(**CFG, shard=True))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' has DKMConfig\(shard=True\)"):
        fully_shard_dkm(model)


def test_direct_fully_shard_with_edkm_sharding_is_refused_at_forward(one_rank):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(seed=0)
    edkm.prepare(model, edkm.DKMConfig(**CFG, shard=True))
    fully_shard(model)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"q_proj' has DKMConfig\(shard=True\) under FSDP2"):
        model(input_ids=ids, labels=ids)


def test_direct_fully_shard_with_importance_buffer_is_refused(one_rank):
    from torch.distributed.fsdp import fully_shard

    model = _model(importance=True)
    fully_shard(model)  # without shard_importance: the buffer would be replicated
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"q_proj.*replicated buffer of 8,192 bytes"):
        model(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match="before fully_shard"):
        shard_importance(model)


def test_direct_fully_shard_after_shard_importance_runs(one_rank):
    from torch.distributed.fsdp import fully_shard

    model = _model(importance=True)
    assert shard_importance(model) == 14  # 2 layers x 7 projections
    fully_shard(model)
    check_fsdp(model)
    ids = torch.zeros(1, 8, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()


def test_sharded_importance_stays_out_of_state_dict():
    model = _model(importance=True)
    shard_importance(model)
    assert not [k for k in model.state_dict() if "importance" in k]
    plain = _model(importance=False)
    plain.load_state_dict(model.state_dict())  # strict: same keys as without importance
    model.load_state_dict(plain.state_dict())  # and back: the importance is not required


def test_local_batch_needs_a_dividing_world_size():
    ids = torch.zeros(6, 4, dtype=torch.long)
    assert local_batch(ids, 3, 2).shape == (2, 4)
    with pytest.raises(ValueError, match="world size 4 does not divide the global batch of 6 rows"):
        local_batch(ids, 4, 0)
    with pytest.raises(ValueError, match="rank=3, world=3"):
        local_batch(ids, 3, 3)
