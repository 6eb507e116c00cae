"""optim.kd_topk: the trainer distils from the teacher's top-k logits stored on disk, keeps
no teacher for the loss, resumes on the same store, and refuses bad values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edkm.train.checkpoint import latest_checkpoint, load_checkpoint
from edkm.train.config import ConfigError, load_config
from edkm.train.data import data_order, load_inputs, micro_indices
from edkm.train.loop import train
from edkm.train.steps import make_teacher
from edkm.train.topk import run_windows

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FAST = ["data.heldout_windows=2", "data.eval_domains=[heldout]", "run.export=false", "data.max_train_windows=64"]


def _cfg(out, *over):
    return load_config(TINY, [f"run.output_dir={out}", *FAST, *over])


def _shards(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "teacher_topk").rglob("*.safetensors")}


def test_first_step_loss_is_the_top_k_kl_of_the_float_model_on_that_batch(tmp_path):
    cfg = _cfg(tmp_path, "optim.loss=kd", "optim.kd_topk=8", "optim.max_steps=1")
    row = train(cfg).metrics[0]
    # Independent reference: the float model's logits on micro-batch 0, its top 8 stored in
    # fp16, renormalised; the student at step 0 is the prepared model (same seed, same init).
    from edkm.preparation import prepare
    from edkm.train.state import seed_all

    seed_all(cfg.run.seed)
    model, _, windows = load_inputs(cfg)
    ids = windows.train[micro_indices(data_order(windows.train.shape[0], cfg.run.seed), 0, cfg.optim.batch_size, 1, 0)]
    with torch.no_grad():
        teacher = model(input_ids=ids).logits.double()
    top = teacher.topk(8, dim=-1)
    prepare(model, cfg.dkm)
    model.train()
    log_q = F.log_softmax(model(input_ids=ids).logits.double(), -1)
    tail_q = log_q.exp().scatter(-1, top.indices, 0.0).sum(-1)
    p = (top.values.half().double() - torch.logsumexp(teacher, -1, keepdim=True)).exp()  # stored in fp16
    tail_p = 1 - p.sum(-1)
    want = ((p * (p.log() - log_q.gather(-1, top.indices))).sum(-1) + tail_p * (tail_p / tail_q).log()).mean()
    head_only = (p * (p.log() - log_q.gather(-1, top.indices))).sum(-1).mean()
    # A tiny random model is nearly flat, so the KL (~1e-4) is a sum of terms ~5 nats that
    # cancel: fp32 rounding of those terms, ~1e-7 each, is the tolerance.
    assert abs(want - head_only) > 1e-5  # the tolerance below tells the tail term apart
    assert row["loss"] == pytest.approx(want.item(), abs=1e-6)
    full = train(_cfg(tmp_path / "full", "optim.loss=kd", "optim.max_steps=1")).metrics[0]["loss"]
    assert 0 < row["loss"] <= full  # pooling the tail can only lose KL


def test_top_k_run_keeps_no_teacher_trains_scores_by_its_kl_and_resumes_on_the_same_store(tmp_path):
    over = ["optim.loss=kd+ce", "optim.kd_topk=16", "optim.max_steps=4", "run.save_every=2", "optim.lr=3e-3"]
    cfg = _cfg(tmp_path / "ref", *over)
    model, _, _ = load_inputs(cfg)
    assert make_teacher(model, cfg, torch.device("cpu")) is None
    ref = train(cfg)
    assert ref.steps == 4 and ref.metrics[-1]["loss"] < ref.metrics[0]["loss"]
    manifest = json.loads((latest_checkpoint(tmp_path / "ref") / "manifest.json").read_text())
    # kd+ce: scored by the held-out objective, its KL from the kept float logits
    rows = {r["step"]: r for r in ref.metrics}
    kl, ppl = rows[4]["heldout_kl"], rows[4]["heldout_ppl"]
    assert manifest["score_by"] == "loss" and kl > 0, manifest
    assert manifest["score"] == pytest.approx(kl + math.log(ppl), rel=1e-12)
    order = data_order(64, cfg.run.seed)  # data.max_train_windows: every window the 4 steps drew is stored, no other
    (store,) = (tmp_path / "ref" / "teacher_topk").iterdir()
    stored = json.loads((store / "manifest.json").read_text())
    assert stored["k"] == 16 and stored["n_windows"] == len(run_windows(order, cfg, 1)) == 16
    want, _ = load_checkpoint(latest_checkpoint(tmp_path / "ref"))

    run = _cfg(tmp_path / "run", *over)
    assert train(run, stop_after=2).steps == 2
    before = _shards(tmp_path / "run")
    train(run, resume=True)
    assert _shards(tmp_path / "run") == before  # reused, not recomputed
    got, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after resume"


@pytest.mark.parametrize("override, text", [
    ("optim.kd_topk=-1", "optim.kd_topk must be an integer >= 0, got -1"),
    ("optim.kd_topk=4", "optim.kd_topk=4 distils from stored teacher logits, which optim.loss=ce does not use"),
])
def test_bad_kd_topk_values_are_named(override, text):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert text in str(info.value)


def test_k_larger_than_the_vocabulary_is_refused_with_both_numbers(tmp_path):
    with pytest.raises(ValueError, match="k=300 exceeds the teacher's vocabulary size 256"):
        train(_cfg(tmp_path, "optim.loss=kd", "optim.kd_topk=300", "optim.max_steps=1"))
