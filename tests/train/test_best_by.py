"""run.best_by: a kd run keeps and exports the checkpoint closest to the float model (held-out
KL), a kd+ce run the one of lowest held-out objective (KL + ce_weight x NLL), a ce run the one
of lowest held-out perplexity; scores of different kinds are never compared; bad combinations
are named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import edkm.train.loop as loop
from edkm.evaluate import fidelity, perplexity
from edkm.preparation import prepare
from edkm.train.checkpoint import best_checkpoint, read_manifest, save_checkpoint
from edkm.train.config import ConfigError, load_config
from edkm.train.data import load_inputs
from edkm.train.steps import heldout_scores, make_teacher

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FAST = ["data.heldout_windows=2", "data.eval_domains=[heldout]", "data.max_train_windows=16",
        "run.loss_spike=0"]  # the tiny model's KL starts near 0 (4e-4): a ratio rule would trip on noise
# (held-out ppl, KL) the scripted evaluation returns at steps 1, 2, 3: perplexity prefers
# step 2, the KL the final step 3.
SCRIPT = [(10.0, 0.5), (8.0, 0.4), (9.0, 0.3)]


def _cfg(out, *over):
    return load_config(TINY, [f"run.output_dir={out}", *FAST, *over])


def _scripted(monkeypatch):
    calls = []

    def fake(model, teacher, heldout, acc, with_kl, teacher_logits=None):
        ppl, kl = SCRIPT[len(calls)]
        calls.append(with_kl)
        return ppl, kl if with_kl else None, None

    monkeypatch.setattr(loop, "heldout_scores", fake)
    return calls


# The score each kind gives a scripted (ppl, kl); "loss" at ce_weight 0.5 for kd+ce: 0.5 + 0.5 log 10 = 1.651,
# 0.4 + 0.5 log 8 = 1.440, 0.3 + 0.5 log 9 = 1.399 (step 3); at ce_weight 1 step 2 (2.479 < 2.497).
SCORE = {"ppl": lambda p, k, w: p, "kl": lambda p, k, w: k, "loss": lambda p, k, w: k + w * math.log(p)}


@pytest.mark.parametrize("over, by, exported", [
    (["optim.loss=kd"], "kl", 3),                      # auto: kd runs are scored by KL
    (["optim.loss=kd+ce"], "loss", 2),                 # auto: kd+ce by KL + ce_weight x NLL
    (["optim.loss=kd+ce", "optim.ce_weight=0.5"], "loss", 3),
    (["optim.loss=kd+ce", "run.best_by=kl"], "kl", 3),
    (["optim.loss=kd", "run.best_by=ppl"], "ppl", 2),
    (["optim.loss=ce"], "ppl", 2),                     # auto: ce runs by perplexity
])
def test_the_best_checkpoint_and_the_export_follow_best_by(tmp_path, monkeypatch, over, by, exported):
    calls = _scripted(monkeypatch)
    cfg = _cfg(tmp_path, "optim.max_steps=3", "run.save_every=1", "run.keep_checkpoints=1", *over)
    assert cfg.score_by == by
    result = loop.train(cfg)
    assert calls == [by != "ppl"] * 3
    best = read_manifest(best_checkpoint(tmp_path))
    want = SCORE[by](*SCRIPT[exported - 1], cfg.optim.ce_weight)
    assert (best["step"], best["score"], best["score_by"]) == (exported, want, by)
    assert result.export_step == exported and result.ppl_after == SCRIPT[-1][0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["heldout_ppl"] for r in rows] == [p for p, _ in SCRIPT]
    assert [r.get("heldout_kl") for r in rows] == [k if by != "ppl" else None for _, k in SCRIPT]
    assert json.loads((tmp_path / "summary.json").read_text())["export_step"] == exported


def test_loss_of_a_ce_run_is_the_log_perplexity_and_needs_no_kl(tmp_path, monkeypatch):
    calls = _scripted(monkeypatch)
    cfg = _cfg(tmp_path, "optim.max_steps=3", "run.save_every=1", "optim.loss=ce", "run.best_by=loss")
    assert not cfg.scores_kl
    loop.train(cfg)
    assert calls == [False] * 3
    best = read_manifest(best_checkpoint(tmp_path))
    assert (best["step"], best["score"], best["score_by"]) == (2, math.log(8.0), "loss")


def test_heldout_scores_are_the_perplexity_and_the_fidelity_kl(tmp_path):
    cfg = _cfg(tmp_path, "optim.loss=kd")
    model, _, windows = load_inputs(cfg)
    teacher = make_teacher(model, cfg, torch.device("cpu"))
    prepare(model, cfg.dkm)
    heldout = windows.heldout[:2]

    class Acc:
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            return torch.autocast("cpu", enabled=False)

    ppl, kl, fid = heldout_scores(model, teacher, heldout, Acc, with_kl=True)
    assert math.isclose(ppl, perplexity(model, heldout), rel_tol=1e-6)
    assert kl == fidelity(model, teacher, heldout).kl and kl > 0
    assert fid == fidelity(model, teacher, heldout)
    assert heldout_scores(model, teacher, heldout, Acc, with_kl=False) == (perplexity(model, heldout), None, None)


def test_a_score_of_another_kind_is_never_compared(tmp_path):
    meta = {"config": {}}
    save_checkpoint(tmp_path, 1, {}, meta, keep=5, score=0.1, score_by="ppl")  # a run resumed with a new best_by
    save_checkpoint(tmp_path, 2, {}, meta, keep=5, score=5.0, score_by="kl")
    assert best_checkpoint(tmp_path).name == "step-000002"  # 5.0 > 0.1, but a KL is no perplexity
    save_checkpoint(tmp_path, 3, {}, meta, keep=5, score=6.0, score_by="kl")
    assert best_checkpoint(tmp_path).name == "step-000002"
    save_checkpoint(tmp_path, 4, {}, meta, keep=5, score=4.0, score_by="kl")
    assert best_checkpoint(tmp_path).name == "step-000004"


def test_old_checkpoints_read_as_scored_by_perplexity(tmp_path):
    save_checkpoint(tmp_path, 1, {}, {"config": {}}, score=30.0)
    manifest_path = tmp_path / "step-000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["score_by"]
    manifest_path.write_text(json.dumps(manifest))
    assert loop._best_score(tmp_path, "ppl") == 30.0 and loop._best_score(tmp_path, "kl") == math.inf


@pytest.mark.parametrize("over, text", [
    (["run.best_by=kl", "optim.loss=ce"], "run.best_by=kl scores checkpoints by KL"),
    (["run.best_by=nll"], "run.best_by must be one of ('auto', 'ppl', 'kl', 'loss'), got 'nll'"),
])
def test_bad_best_by_is_named(over, text):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(TINY, over)
    assert text in str(info.value)
