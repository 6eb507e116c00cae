"""Divergence guard: a diverged state is never saved; stop names the step and layer;
rollback reloads the last good checkpoint with half the lr."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import edkm
from edkm.hub.models import tiny_llama
from edkm.train.checkpoint import latest_checkpoint, load_checkpoint
from edkm.train.config import load_config
from edkm.train.guard import DivergenceError, DivergenceGuard, first_bad_tensor
from edkm.train.loop import train

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FAST = ["data.max_train_windows=64", "data.heldout_windows=2", "run.export=false"]


def _cfg(out, *over):
    return load_config(TINY, [f"run.output_dir={out}", *FAST, *over])


def _prepared():
    model = tiny_llama(vocab_size=256, hidden=64, layers=1)
    edkm.prepare(model, edkm.DKMConfig(bits=2, min_weight_numel=1024))
    return model


def test_huge_lr_stops_at_step_1_and_writes_no_checkpoint(tmp_path):
    with pytest.raises(DivergenceError, match=r"diverged at step 1: .*(non-finite|max_weight_abs)") as info:
        train(_cfg(tmp_path, "optim.lr=1e5", "run.save_every=1", "optim.max_steps=3"))
    assert "model." in str(info.value)  # the first bad layer is named
    assert latest_checkpoint(tmp_path) is None and not list(tmp_path.glob("step-*"))
    assert not (tmp_path / "lock").exists()  # released on the error


def test_guard_names_the_first_bad_tensor():
    model = _prepared()
    assert first_bad_tensor(model, 65504.0) is None
    q = model.model.layers[0].self_attn.q_proj.parametrizations.weight.original
    with torch.no_grad():
        q[3, 5] = 7e4
    assert first_bad_tensor(model, 65504.0) == \
        "model.layers.0.self_attn.q_proj.weight has max |value| 7e+04 > run.max_weight_abs=65504"
    assert first_bad_tensor(model, 0.0) is None  # range check off: only the finite check
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    assert first_bad_tensor(model, 0.0) == "model.norm.weight holds non-finite values (max |value| nan)"


def test_guard_loss_checks_and_history():
    model = _prepared()
    guard = DivergenceGuard(loss_spike=10.0, window=3)
    for loss in (5.0, 4.0, 3.0, 2.0):
        assert guard.check(loss, 1.0, model) is None
    assert guard.losses == [4.0, 3.0, 2.0]  # the last `window` accepted losses
    assert "more than run.loss_spike=10 times the mean of the last 3 losses (3)" in guard.check(30.5, 1.0, model)
    assert guard.check(29.5, 1.0, model) is None  # 29.5 < 10 * 3: accepted
    assert guard.check(float("nan"), 1.0, model) == "the training loss is nan"
    assert guard.check(1.0, math.inf, model, "model.layers.0.mlp.up_proj.weight") == \
        "the gradient norm is inf (first non-finite gradient: model.layers.0.mlp.up_proj.weight)"
    restored = DivergenceGuard(window=3)
    restored.load_state_dict(guard.state_dict())
    assert restored.losses == guard.losses
    off = DivergenceGuard(loss_spike=0.0)
    off.check(1.0, None, model)
    assert off.check(1e9, None, model) is None


def test_rollback_reloads_last_good_checkpoint_with_half_lr(tmp_path, monkeypatch):
    over = ["optim.max_steps=4", "run.save_every=2"]
    ref = train(_cfg(tmp_path / "ref", *over))
    calls = {"n": 0}
    real = DivergenceGuard.check

    def inject(self, loss, norm, model, bad=None):  # step 3 diverges once
        calls["n"] += 1
        if calls["n"] == 3:
            return "injected divergence"
        return real(self, loss, norm, model, bad)

    monkeypatch.setattr(DivergenceGuard, "check", inject)
    run = tmp_path / "run"
    got = train(_cfg(run, *over, "run.on_divergence=rollback"))
    assert got.steps == 4 and got.rollbacks == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["rollbacks"] for r in rows] == [0, 0, 1, 1]
    want = {r["step"]: r for r in ref.metrics}
    assert [r["loss"] for r in rows[:2]] == [want[1]["loss"], want[2]["loss"]]
    assert rows[2]["lr"] == want[3]["lr"] / 2 and rows[3]["lr"] == want[4]["lr"] / 2  # x0.5 is exact
    assert rows[2]["loss"] == want[3]["loss"]  # step 3 replays the same batch from step 2's weights
    state, _ = load_checkpoint(latest_checkpoint(run))
    assert state["rollbacks"] == 1 and state["lr_scale"] == 0.5


def test_rollback_gives_up_after_max_rollbacks(tmp_path):
    cfg = _cfg(tmp_path, "optim.lr=1e5", "optim.max_steps=3", "run.on_divergence=rollback", "run.max_rollbacks=1")
    with pytest.raises(DivergenceError, match="at step 2: .* 1 rollback\\(s\\) of run.max_rollbacks=1 used"):
        train(cfg)
    state, manifest = load_checkpoint(latest_checkpoint(tmp_path))
    assert manifest["step"] == 0  # only the good start state was ever written
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_heldout_score_vets_the_weights_a_checkpoint_would_hold():
    guard = DivergenceGuard(loss_spike=10.0)
    assert guard.check_heldout(1e30) is None  # no training loss yet: only the finite check
    assert guard.check_heldout(math.inf) == "the held-out perplexity is inf"
    guard.check(2.0, None, _prepared())
    assert guard.check_heldout(math.exp(19.0)) is None
    assert guard.check_heldout(math.exp(21.0)).startswith("the held-out loss 21 (perplexity 1.319e+09) is more than")
