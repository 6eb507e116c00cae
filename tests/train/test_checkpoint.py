"""Checkpoints: a failed write keeps the previous one, stale temporaries are removed,
pruning keeps the best scored checkpoint, and disk-full errors say so."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from edkm.train.checkpoint import (
    CheckpointError,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from edkm.train.config import load_config
from edkm.train.loop import train

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FAST = ["data.max_train_windows=64", "data.heldout_windows=2", "run.export=false"]


def _cfg(out, *over):
    return load_config(TINY, [f"run.output_dir={out}", *FAST, *over])


def test_torch_save_failing_mid_checkpoint_keeps_the_previous_one_and_resume_works(tmp_path, monkeypatch):
    over = ["optim.max_steps=4", "run.save_every=2"]
    train(_cfg(tmp_path / "ref", *over))
    want, _ = load_checkpoint(latest_checkpoint(tmp_path / "ref"))
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *args, **kwargs):  # the 2nd checkpoint dies half-written
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*\.tmp-step-000004-\d+/state.pt: .*"
                                              r"unexpected pos 64 vs 0 \(needs about \d+ bytes, \d+ bytes free"):
        train(_cfg(run, *over))
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(run).name == "step-000002"
    assert load_checkpoint(latest_checkpoint(run))[1]["step"] == 2  # intact: the digest verifies
    assert not list(run.glob(".tmp-*")) and not (run / "lock").exists()
    assert train(_cfg(run, *over), resume=True).steps == 4
    got, _ = load_checkpoint(latest_checkpoint(run))
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after the failed checkpoint + resume"


def test_disk_full_error_names_path_and_bytes(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 10, 10))

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("unexpected pos")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(1000)}, {})
    msg = str(info.value)
    assert str(tmp_path) in msg and "needs about 4000 bytes, 10 bytes free" in msg and "no space left" in msg
    assert not list(tmp_path.glob(".tmp-*")) and latest_checkpoint(tmp_path) is None


def test_stale_temporaries_are_removed_at_startup(tmp_path):
    cfg = _cfg(tmp_path, "optim.max_steps=2", "run.save_every=1")
    train(cfg, stop_after=1)
    stale = tmp_path / ".tmp-step-000002-999999"  # what a kill -9 mid-checkpoint leaves
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"partial")
    (tmp_path / ".latest.tmp-999999").write_text("step-000002\n")
    assert train(cfg, resume=True).steps == 2
    assert not stale.exists() and not (tmp_path / ".latest.tmp-999999").exists()


def test_prune_keeps_the_best_scored_checkpoint(tmp_path):
    for step, score in [(1, 5.0), (2, 3.0), (3, 4.0), (4, 6.0), (5, float("nan"))]:
        save_checkpoint(tmp_path, step, {"step": step}, {}, keep=1, score=score)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000005"]
    assert best_checkpoint(tmp_path).name == "step-000002" and latest_checkpoint(tmp_path).name == "step-000005"
    assert read_manifest(best_checkpoint(tmp_path))["score"] == 3.0


def test_every_checkpoint_of_a_run_is_scored_and_best_is_the_lowest(tmp_path):
    cfg = _cfg(tmp_path, "optim.max_steps=4", "run.save_every=1", "run.keep_checkpoints=4", "run.eval_every=1")
    result = train(cfg)
    scores = {int(p.name[5:]): read_manifest(p)["score"] for p in tmp_path.glob("step-*")}
    assert sorted(scores) == [1, 2, 3, 4]
    assert scores == {r["step"]: r["heldout_ppl"] for r in result.metrics}
    assert read_manifest(best_checkpoint(tmp_path))["score"] == min(scores.values())
    assert result.ppl_after == scores[4]  # the final score is the reported perplexity


def test_prune_orders_steps_numerically(tmp_path):
    save_checkpoint(tmp_path, 999_999, {"x": 1}, {}, keep=1)
    save_checkpoint(tmp_path, 1_000_000, {"x": 2}, {}, keep=1)  # "step-1000000" < "step-999999" as text
    state, manifest = load_checkpoint(latest_checkpoint(tmp_path))
    assert manifest["step"] == 1_000_000 and state["x"] == 2
    assert not (tmp_path / "step-999999").exists()


def test_unreadable_manifest_names_the_file(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": 1}, {})
    (tmp_path / "step-000001" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{tmp_path}/step-000001/manifest.json is missing or unreadable"):
        load_checkpoint(tmp_path / "step-000001")
