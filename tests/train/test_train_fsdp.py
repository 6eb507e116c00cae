"""`edkm train` under FSDP2 (``optim.fsdp=true``, 2 gloo ranks on CPU) on the tiny config.

One spawn of two ranks runs `edkm.train.loop.train` three times: an uninterrupted FSDP2
run (``full``), and a run stopped after ``STOP`` steps (``stop_after``) then resumed
(``part``). The reference is the same config in this one process without FSDP, at twice
the per-process batch size, so both see the same global batches (`edkm.train.data.micro_batch`
gives rank r rows ``[(2m + r) b, (2m + r + 1) b)`` of micro-batch m).

Rules: FSDP2 vs one process is the rule of tests/test_fsdp.py (step 0 within 1e-5
relative, fp32 summation order only; later losses and the final LUTs within one bf16 ulp,
2**-8); stopped + resumed vs uninterrupted is bitwise (same ranks, same ops); the trainer's
export is byte-equal to ``edkm export``'s one-process export of the same checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader

import edkm
from edkm.train.checkpoint import latest_checkpoint, load_checkpoint
from edkm.train.commands import export_checkpoint
from edkm.train.config import ConfigError, load_config
from edkm.train.data import load_model
from edkm.train.guard import DivergenceGuard
from edkm.train.loop import train
from edkm.train.resume import config_changes
from edkm.train.sharded import is_sharded_checkpoint, load_sharded_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo file:// rendezvous tested on Linux")

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
WORLD, STEPS, STOP, BATCH = 2, 4, 2, 4
ROLLBACK, ROLLBACK_AT = ["run.on_divergence=rollback", "run.export=false"], {1, 4}
KD = ["optim.loss=kd", "optim.lr=3e-4", "run.export=false"]
COMMON = [f"optim.max_steps={STEPS}", "optim.grad_accum=2", "run.save_every=2", "run.domains_every=2",
          "data.eval_domains=[heldout]"]


def _config(out: Path, fsdp: bool, *extra: str):
    per_process = BATCH // WORLD if fsdp else BATCH
    return load_config(TINY, [f"run.output_dir={out}", f"optim.batch_size={per_process}", f"optim.fsdp={fsdp}",
                              *COMMON, *extra])


def _one_rank(rank, port, out, *extra):
    """FSDP2 over one process as ``torchrun --nproc-per-node 1`` starts it: no process group
    yet (accelerate makes none for one CPU process), so `edkm.train.fsdp.accelerator` does.
    The ``kd`` loss: the teacher is sharded too and runs a forward pass every micro-batch."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(_config(Path(out), True, f"optim.batch_size={BATCH}", *KD, *extra))
    dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def _diverging(calls: set[int]):
    """The guard reports divergence at these calls of `DivergenceGuard.check` (1 = step 1)."""
    real, count = DivergenceGuard.check, [0]

    def check(self, *args):  # the real check first: its collectives (FSDP2 shards' norms) run on every rank
        reason = real(self, *args)
        count[0] += 1
        return "injected divergence" if count[0] in calls else reason

    DivergenceGuard.check = check
    try:
        yield
    finally:
        DivergenceGuard.check = real


def _worker(rank, init_file, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    root = Path(root)
    train(_config(root / "full", True))
    part = _config(root / "part", True, "run.export=false")
    assert train(part, stop_after=STOP).steps == STOP
    train(part, resume=True)
    # rank 0 alone sees divergence at step 1 (back to the step-0 checkpoint) and step 3 (back to step 2)
    with _diverging(ROLLBACK_AT if rank == 0 else set()):
        train(_config(root / "rollback", True, *ROLLBACK))
    # Both ranks leave together: see the note in tests/train/test_sharded.py (SIGABRT at exit).
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The FSDP2 runs (2 ranks) and the one-process reference, each run's directory."""
    root = tmp_path_factory.mktemp("fsdp-train")
    mp.spawn(_worker, args=(str(root / "init"), str(root)), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    train(_config(root / "one", False))
    with _diverging(ROLLBACK_AT):
        train(_config(root / "one-rollback", False, *ROLLBACK))
    return root


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sharded_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's full model state, read in this process."""
    config = load_config(TINY, [f"run.output_dir={ckpt.parent}", *COMMON])
    model, _ = load_model(config)
    edkm.prepare(model, config.dkm)
    load_sharded_model(ckpt, model)
    return model.state_dict()


def test_fsdp_train_matches_one_process(runs):
    got, want = _rows(runs / "full"), _rows(runs / "one")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    a, b = got[0]["loss"], want[0]["loss"]
    assert abs(a - b) <= 1e-5 * abs(b), f"step 1 loss: FSDP2 {a!r} vs one process {b!r}"
    ulp = 2**-8
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= ulp * abs(w["loss"]), (g["step"], g["loss"], w["loss"])
    for step in (2, 4):  # held-out perplexity and the domains curve, scored on every rank under FSDP2
        g, w = got[step - 1], want[step - 1]
        assert abs(g["heldout_ppl"] - w["heldout_ppl"]) <= ulp * w["heldout_ppl"], (step, g, w)
        assert g["domains"].keys() == w["domains"].keys() == {"heldout"}
    last = latest_checkpoint(runs / "full")
    assert is_sharded_checkpoint(last) and last.name == f"step-{STEPS:06d}"
    chunks = FileSystemReader(last / "dcp").read_metadata().state_dict_metadata[
        "model.model.layers.0.self_attn.q_proj.parametrizations.weight.original"].chunks
    assert [tuple(c.sizes) for c in chunks] == [(32, 64), (32, 64)]  # (64, 64) sharded by FSDP2 over 2 ranks
    full, (one, _) = _sharded_state(last), load_checkpoint(latest_checkpoint(runs / "one"))
    luts = sorted(k for k in one["model"] if k.endswith(".centroids"))
    assert luts and set(luts) <= set(full)
    for name in luts:
        w = one["model"][name]
        err = ((full[name] - w).abs().max() / w.abs().max()).item()
        assert err < ulp, f"{name}: final LUT differs by {err:.3g} (tolerance {ulp:.1e})"
    summary = json.loads((runs / "full" / "summary.json").read_text())
    assert summary["domains"].keys() == {"heldout"} and summary["steps"] == STEPS
    assert summary["domains"]["heldout"]["after"]["perplexity"] > 1


def test_fsdp_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(runs):
    got, want = _rows(runs / "part"), _rows(runs / "full")
    keys = ("step", "loss", "lr", "tau", "grad_norm", "heldout_ppl", "centroid_drift", "domains")
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in want]
    a, b = _sharded_state(latest_checkpoint(runs / "part")), _sharded_state(latest_checkpoint(runs / "full"))
    assert a.keys() == b.keys()
    for name, value in b.items():
        assert torch.equal(a[name], value), f"{name} differs after stop + resume"
    history = json.loads((latest_checkpoint(runs / "part") / "manifest.json").read_text())["meta"]["resumed"]
    assert [h["step"] for h in history] == [STOP]


def test_fsdp_rollback_matches_one_process(runs):
    got, want = _rows(runs / "rollback"), _rows(runs / "one-rollback")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert [r["rollbacks"] for r in got] == [r["rollbacks"] for r in want] == [1, 1, 2, 2]
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    for g, w in zip(got, want):  # the step-1 replay (AdamW restarted) and the step-3 replay, as in one process
        assert abs(g["loss"] - w["loss"]) <= 2**-8 * abs(w["loss"]), (g["step"], g["loss"], w["loss"])
    assert got[0]["loss"] == _rows(runs / "full")[0]["loss"]  # the step-1 replay starts from the same weights
    full, (one, _) = _sharded_state(latest_checkpoint(runs / "rollback")), load_checkpoint(
        latest_checkpoint(runs / "one-rollback"))
    # LUTs and master weights (max-normalised): a rollback to step 0 that kept AdamW's moments
    # moves the weights by ~7e-2 here, the FSDP2 summation order by ~4e-5
    for name in (k for k, v in one["model"].items() if v.is_floating_point()):
        err = ((full[name] - one["model"][name]).abs().max() / one["model"][name].abs().max()).item()
        assert err < 2**-8, f"{name}: final state after rollbacks differs by {err:.3g}"


def test_fsdp_export_is_the_one_process_export_of_its_checkpoint(runs):
    summary = json.loads((runs / "full" / "summary.json").read_text())
    step = summary["export_step"]
    assert step in (2, 4)  # the best scored checkpoint
    one = export_checkpoint(runs / "full" / f"step-{step:06d}", runs / "one-process.edkm.safetensors")
    exported = runs / "full" / "model.edkm.safetensors"
    assert exported.read_bytes() == one["out"].read_bytes(), "FSDP2 export vs one-process export of its checkpoint"
    assert summary["sizes"] == one["sizes"]


@pytest.mark.parametrize("extra", [(), ("optim.freeze=[model.embed_tokens.weight, '*norm.weight']",)],
                         ids=["all-trained", "frozen-embedding-and-norms"])
def test_fsdp_over_one_process_with_kd_matches_one_process(tmp_path, extra):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_one_rank, args=(port, str(tmp_path / "fsdp"), *extra), nprocs=1, join=True)
    torch.set_num_threads(1)
    train(_config(tmp_path / "one", False, *KD, *extra))
    got, want = _rows(tmp_path / "fsdp"), _rows(tmp_path / "one")
    assert len(got) == len(want) == STEPS
    assert abs(got[0]["loss"] - want[0]["loss"]) <= 1e-5 * abs(want[0]["loss"]), (got[0], want[0])
    for g, w in zip(got, want):  # the rule of tests/test_fsdp.py, as in test_fsdp_train_matches_one_process
        assert abs(g["loss"] - w["loss"]) <= 2**-8 * abs(w["loss"]), (g["step"], g["loss"], w["loss"])
    manifest = json.loads((latest_checkpoint(tmp_path / "fsdp") / "manifest.json").read_text())
    assert manifest["format"] == "dcp-sharded/1" and manifest["world_size"] == 1


def test_a_non_finite_fsdp_gradient_is_named(tmp_path):
    from edkm.distributed import fully_shard_dkm
    from edkm.train.steps import _grad_norm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        config = _config(tmp_path, True)
        model, _ = load_model(config)
        fully_shard_dkm(edkm.prepare(model.train(), config.dkm))
        ids = torch.zeros(1, 8, dtype=torch.long)
        model(input_ids=ids, labels=ids).loss.backward()
        norm, bad = _grad_norm(model, config)
        assert norm > 0 and bad is None
        grad = model.model.layers[1].mlp.up_proj.parametrizations.weight.original.grad
        assert hasattr(grad, "full_tensor")  # a DTensor shard
        grad.to_local()[3, 5] = float("nan")
        norm, bad = _grad_norm(model, config)
        assert norm != norm and bad == "model.layers.1.mlp.up_proj.weight", (norm, bad)
    finally:
        dist.destroy_process_group()


def test_fsdp_config_errors_name_the_values(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'dkm.shard=true'.*optim.fsdp=true with dkm.shard=true") as err:
        _config(tmp_path, True, "dkm.shard=true")
    assert "run.output_dir" not in str(err.value)  # only the overrides the rule is about
    with pytest.raises(ConfigError, match=r"optim.fsdp = 'maybe' \(str\): expected true or false"):
        _config(tmp_path, "maybe")
    with pytest.raises(ConfigError, match=r"optim.fsdp=true needs torch.distributed .*WORLD_SIZE="):
        train(_config(tmp_path, True))  # no launcher, no process group


def test_resume_refuses_a_change_of_fsdp(tmp_path):
    plain = load_config(TINY, [f"run.output_dir={tmp_path}", *COMMON])
    meta = {"config": plain.to_dict(), "world_size": WORLD}
    sharded = load_config(TINY, [f"run.output_dir={tmp_path}", *COMMON, "optim.fsdp=true"])
    with pytest.raises(ConfigError, match=r"cannot change mid-run: optim.fsdp \(False -> True\); resume"):
        config_changes(meta, sharded, WORLD)
