"""Trainer, CLI, checkpoints (kill -9 and resume), export/reload, on the tiny config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import edkm
from edkm.export import export_compressed, load_compressed
from edkm.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from edkm.train.config import load_config
from edkm.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edkm", "--quiet", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_train_tiny_end_to_end_and_reload(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "optim.max_steps=6", "run.save_every=3"])
    result = train(cfg)
    assert result.steps == 6 and result.ppl_after < result.ppl_before, (result.ppl_before, result.ppl_after)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows == result.metrics
    assert {"loss", "tokens_per_s", "peak_mem_bytes", "centroid_drift", "lr", "tau", "grad_norm"} <= set(rows[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sizes"]["file"] < summary["sizes"]["fp16"]
    assert summary["ppl_after"] == result.ppl_after == rows[-1]["heldout_ppl"]  # the step-6 checkpoint's score
    best_step = 3 if rows[2]["heldout_ppl"] < rows[5]["heldout_ppl"] else 6  # the export takes the best
    assert summary["export_step"] == result.export_step == best_step
    model = load_compressed(result.export_path)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()
    out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 9)


def test_export_reload_logits_equal_finalized(tmp_path):
    from edkm.hub.models import tiny_llama

    model = tiny_llama(vocab_size=256, hidden=64, layers=2)
    edkm.prepare(model, edkm.DKMConfig(bits=3, granularity="per_grouped_channel", group_size=16,
                                       include_embeddings=True, min_weight_numel=0))
    edkm.finalize(model.eval())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    exact = tmp_path / "exact.edkm.safetensors"
    sizes = export_compressed(model, exact, lut_dtype=None, dense_dtype=None)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(exact)(ids).logits, want, rtol=0, atol=0)
    half = tmp_path / "half.edkm.safetensors"
    sizes = export_compressed(model, half)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(half)(ids).logits, want, rtol=2e-2, atol=2e-2)
    uniq = {id(m.indices): m.indices for m in model.modules() if isinstance(m, (edkm.LUTLinear, edkm.LUTEmbedding))}
    assert sizes["codes"] == sum((t.numel() * 3 + 7) // 8 for t in uniq.values())  # tied head stored once


def test_kill9_then_resume_matches_uninterrupted_run(tmp_path):
    common = ["train", "--config", str(TINY), "--max-steps", "10", "run.save_every=2", "run.export=false"]
    ref = _cli(*common, "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edkm", "--quiet", *common, "--output-dir", str(run)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = latest_checkpoint(run) if (run / "latest").exists() else None
        if ckpt is not None and int(ckpt.name.split("-")[1]) >= 4:
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed; make the run longer")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(run).name.split("-")[1])
    assert 4 <= killed_at < 10
    res = _cli(*common, "--output-dir", str(run), "--resume")
    assert res.returncode == 0, res.stderr
    got, _ = load_checkpoint(latest_checkpoint(run))
    want, _ = load_checkpoint(latest_checkpoint(tmp_path / "ref"))
    assert got["step"] == want["step"] == 10
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after kill -9 + resume"
    ref_rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    got_rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in got_rows] == list(range(1, 11))  # steps after the checkpoint not doubled
    assert [json.loads(r)["loss"] for r in got_rows] == [json.loads(r)["loss"] for r in ref_rows]


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "optim.max_steps=2", "run.save_every=1",
                             "run.export=false"])
    train(cfg)
    state = latest_checkpoint(tmp_path) / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(cfg, resume=True)
    res = _cli("train", "--config", str(TINY), "--output-dir", str(tmp_path), "--resume", "--max-steps", "2")
    assert res.returncode == 1 and "corrupt or truncated" in res.stderr and str(state) in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("edkm: error: checkpoint file")  # one line, no traceback
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(load_config(TINY, [f"run.output_dir={tmp_path / 'empty'}"]), resume=True)


def test_cli_lowrank_then_train_clusters_the_factors(tmp_path):
    out = tmp_path / "lord"
    res = _cli("lowrank", "--config", str(TINY), "--out", str(out), "--calib-windows", "4",
               "lowrank.rank_reduction=0.25")
    assert res.returncode == 0, res.stderr
    assert "removed" in res.stdout and (out / "lowrank.json").is_file()
    run = tmp_path / "run"
    res = _cli("train", "--config", str(TINY), "--max-steps", "2", f"model.source={out}", f"run.output_dir={run}")
    assert res.returncode == 0, res.stderr
    model = load_compressed(run / "model.edkm.safetensors")
    names = [n for n, m in model.named_modules() if isinstance(m, edkm.LUTLinear)]
    assert any(n.endswith(".down") for n in names) and any(n.endswith(".up") for n in names)
    res = _cli("lowrank", "--config", str(TINY), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "no 'lowrank' section" in res.stderr


def test_importance_weighted_training_resumes_exactly(tmp_path):
    over = ["optim.max_steps=4", "run.save_every=2", "run.export=false", "data.importance_windows=4"]
    ref = train(load_config(TINY, [f"run.output_dir={tmp_path / 'ref'}", *over]))
    assert ref.steps == 4 and ref.ppl_after < ref.ppl_before
    want, _ = load_checkpoint(latest_checkpoint(tmp_path / "ref"))
    train(load_config(TINY, [f"run.output_dir={tmp_path / 'plain'}", *over[:-1]]))
    unweighted, _ = load_checkpoint(latest_checkpoint(tmp_path / "plain"))
    centroids = sorted(k for k in want["model"] if k.endswith(".centroids"))
    same = [k for k in centroids if torch.equal(unweighted["model"][k], want["model"][k])]
    assert centroids and not same, f"the weighting left these LUTs unchanged: {same}"  # it took part everywhere
    res = _cli("export", "--checkpoint", str(tmp_path / "ref"), "--out", str(tmp_path / "m.safetensors"))
    assert res.returncode == 0, res.stderr  # the checkpoint loads into a model prepared without importance
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", *over])
    assert train(cfg, stop_after=2).steps == 2
    train(cfg, resume=True)
    got, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after resume"
    with pytest.raises(ValueError, match="importance_windows=99999"):
        train(load_config(TINY, [f"run.output_dir={tmp_path / 'bad'}", "data.importance_windows=99999"]))


def test_gap_tau_run_resumes_with_the_factors_fixed_at_the_start(tmp_path, monkeypatch):
    over = ["optim.max_steps=4", "run.save_every=2", "run.export=false", "dkm.tau_mode=gap"]
    train(load_config(TINY, [f"run.output_dir={tmp_path / 'ref'}", *over]))
    want, _ = load_checkpoint(latest_checkpoint(tmp_path / "ref"))
    scales = {k: float(v) for k, v in want["model"].items() if k.endswith(".tau_scale")}
    assert scales and len(set(scales.values())) > 1, scales  # the layers got their own taus
    train(load_config(TINY, [f"run.output_dir={tmp_path / 'global'}", *over[:-1]]))
    glob, _ = load_checkpoint(latest_checkpoint(tmp_path / "global"))
    assert all(float(glob["model"][k]) == 1.0 for k in scales)
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", *over])
    assert train(cfg, stop_after=2).steps == 2
    # A resume that recomputed the factors would get these (wrong) ones; the checkpoint's must win.
    monkeypatch.setattr(edkm.layers.DKMWeight, "spacing", lambda self: float(self.centroids.numel()))
    train(cfg, resume=True)
    got, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after resume"


def test_compensated_run_starts_from_compensated_weights_and_resumes_exactly(tmp_path, monkeypatch):
    over = ["optim.max_steps=4", "run.save_every=2", "run.export=false", "data.compensate_windows=4",
            "data.compensate_text=train", "run.on_divergence=rollback", "run.keep_checkpoints=3"]
    train(load_config(TINY, [f"run.output_dir={tmp_path / 'ref'}", *over]))
    step0, _ = load_checkpoint(tmp_path / "ref" / "step-000000")  # rollback's starting state
    want, _ = load_checkpoint(latest_checkpoint(tmp_path / "ref"))
    masters = [k for k in step0["model"] if k.endswith("parametrizations.weight.original")]
    assert masters
    for key in masters:  # every master weight at step 0 is a centroid of its LUT group
        cents = step0["model"][key.replace("parametrizations.weight.original", "parametrizations.weight.0.centroids")]
        w = step0["model"][key]
        rows = w.shape[0] // cents.shape[0]
        lut = cents[:, :, 0].repeat_interleave(rows, 0)
        assert all(bool(torch.isin(w[r], lut[r]).all()) for r in range(w.shape[0])), key
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", *over])
    assert train(cfg, stop_after=2).steps == 2
    # A resume must not compensate again (the checkpoint holds the weights): make it fail if it does.
    monkeypatch.setattr("edkm.train.loop.calibration_hessians", lambda *a, **k: pytest.fail("compensated on resume"))
    train(cfg, resume=True)
    got, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after resume"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="compensate_windows=99999"):
        train(load_config(TINY, [f"run.output_dir={tmp_path / 'bad'}", "data.compensate_windows=99999",
                                 "data.compensate_text=train"]))
