"""--resume applies the config changes it can (and says so) and refuses the others,
listing every changed key; the manifest records what actually ran."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edkm.train.checkpoint import latest_checkpoint, read_manifest
from edkm.train.config import ConfigError, load_config
from edkm.train.loop import train
from edkm.train.resume import config_changes
from edkm.train.schedule import lr_lambda

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FAST = ["data.max_train_windows=64", "data.heldout_windows=2", "run.export=false", "optim.max_steps=4"]


def _cfg(out, *over):
    return load_config(TINY, [f"run.output_dir={out}", *FAST, *over])


def test_resume_with_a_new_lr_rebases_the_scheduler_and_records_it(tmp_path, caplog):
    train(_cfg(tmp_path, "optim.lr=3e-3"), stop_after=2)
    new = _cfg(tmp_path, "optim.lr=1e-4")
    with caplog.at_level(logging.INFO, logger="edkm.train"):
        result = train(new, resume=True)
    f = lr_lambda(new)
    assert [r["lr"] for r in result.metrics] == [1e-4 * f(3), 1e-4 * f(4)]  # not 3e-3's schedule
    assert "optim.lr changed 0.003 -> 0.0001 (applied)" in caplog.text
    assert "scheduler re-based on optim.lr=0.0001" in caplog.text
    meta = read_manifest(latest_checkpoint(tmp_path))["meta"]
    assert meta["config"]["optim"]["lr"] == 1e-4
    assert meta["resumed"] == [{"step": 2, "applied": {"optim.lr": [0.003, 0.0001]}}]


def test_resume_refuses_changes_that_move_the_data_or_the_model_and_lists_them(tmp_path):
    train(_cfg(tmp_path), stop_after=1)
    other = _cfg(tmp_path, "optim.batch_size=2", "data.seq_len=32", "run.seed=1")
    with pytest.raises(ConfigError) as info:
        train(other, resume=True)
    msg = str(info.value)
    for item in ("data.seq_len (64 -> 32)", "optim.batch_size (4 -> 2)", "run.seed (0 -> 1)"):
        assert item in msg, msg


def test_unchanged_or_cadence_only_resume_applies_nothing_to_the_schedule():
    cfg = load_config(TINY)
    meta = {"config": cfg.to_dict(), "world_size": 1}
    assert config_changes(meta, cfg, 1) == {}
    later = load_config(TINY, ["optim.max_steps=20", "run.save_every=5", "run.output_dir=elsewhere"])
    assert config_changes(meta, later, 1) == {"optim.max_steps": (12, 20), "run.save_every": (4, 5)}
    with pytest.raises(ConfigError, match=r"processes \(2 -> 1\)"):
        config_changes({"config": cfg.to_dict(), "world_size": 2}, cfg, 1)


def test_keys_older_checkpoints_lack_take_their_defaults():
    cfg = load_config(TINY)
    saved = cfg.to_dict()
    del saved["data"]["importance_windows"]  # written before the key existed
    del saved["run"]["on_divergence"]
    assert config_changes({"config": saved, "world_size": 1}, cfg, 1) == {}
    with pytest.raises(ConfigError, match=r"data.seq_len \(64 -> 32\)"):
        config_changes({"config": saved, "world_size": 1}, load_config(TINY, ["data.seq_len=32"]), 1)
