"""The CLI boundary: one line `edkm: error: ...`, exit 2 for usage and 1 for runtime
errors, --debug for the traceback; export picks the best checkpoint and says which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edkm.cli import main
from edkm.train.checkpoint import best_checkpoint, read_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["data.max_train_windows=64", "data.heldout_windows=2"]


def _run(capsys, *argv):
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("edkm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_usage_errors_exit_2_with_one_line(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "--config", TINY, "dkm.bits=0")
    assert code == 2 and "bits must be an integer in [1, 8], got 0" in _error_line(err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [\n")
    code, _, err = _run(capsys, "train", "--config", str(bad))
    assert code == 2 and f"{bad}:3: YAML syntax error" in _error_line(err)
    code, _, err = _run(capsys, "lowrank", "--config", TINY, "--out", str(tmp_path / "x"))
    assert code == 2 and "no 'lowrank' section" in _error_line(err)
    with pytest.raises(SystemExit) as info:  # argparse's own usage errors
        main(["train", "--max-steps", "many"])
    assert info.value.code == 2


def test_runtime_errors_exit_1_and_debug_shows_the_traceback(capsys, tmp_path):
    missing = tmp_path / "gone.edkm.safetensors"
    code, _, err = _run(capsys, "eval", "--model", str(missing), "--config", TINY)
    assert code == 1 and f"compressed model '{missing}' does not exist" in _error_line(err)
    cut = tmp_path / "cut.edkm.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    code, _, err = _run(capsys, "eval", "--model", str(cut), "--config", TINY)
    assert code == 1 and f"{cut} is not a readable safetensors file" in _error_line(err)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        main(["--quiet", "eval", "--model", str(cut), "--config", TINY, "--debug"])
    code, _, err = _run(capsys, "train", "--config", TINY, "--output-dir", str(tmp_path / "r"), "--max-steps", "2",
                        "optim.lr=1e5", *FAST)
    assert code == 1 and "training diverged at step 1" in _error_line(err)


def test_export_takes_the_best_checkpoint_and_says_which(capsys, tmp_path):
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--config", TINY, "--output-dir", str(run), "--max-steps", "3",
                          "run.save_every=1", "run.keep_checkpoints=1", "run.export=false", *FAST)
    assert code == 0, err
    best = read_manifest(best_checkpoint(run))
    dest = tmp_path / "new" / "dir" / "m.edkm.safetensors"  # the directory is created
    code, out, err = _run(capsys, "export", "--checkpoint", str(run), "--out", str(dest))
    assert code == 0, err
    assert best["score_by"] == "ppl"  # optim.loss=ce: checkpoints scored by held-out perplexity
    assert f"exported step {best['step']} (held-out ppl {best['score']:.4g}) from {run / best_checkpoint(run).name}" \
        in out and dest.is_file()
    code, out, _ = _run(capsys, "export", "--checkpoint", str(run), "--out", str(dest), "--which", "latest")
    assert code == 0 and "exported step 3 " in out


def test_eval_reports_the_same_perplexity_the_run_scored(capsys, tmp_path):
    """An exact (fp32) export of a checkpoint scores what the run recorded for it."""
    from edkm.export import export_compressed
    from edkm.preparation import finalize, prepare
    from edkm.train.checkpoint import latest_checkpoint, load_checkpoint
    from edkm.train.config import TrainConfig
    from edkm.train.data import load_model

    run = tmp_path / "run"
    code, _, err = _run(capsys, "train", "--config", TINY, "--output-dir", str(run), "--max-steps", "2",
                        "run.export=false", *FAST)
    assert code == 0, err
    state, manifest = load_checkpoint(latest_checkpoint(run))
    config = TrainConfig.from_dict(manifest["meta"]["config"])
    model, _ = load_model(config)
    prepare(model, config.dkm)
    model.load_state_dict(state["model"])
    exact = tmp_path / "exact.edkm.safetensors"
    export_compressed(finalize(model.eval()), exact, lut_dtype=None, dense_dtype=None)
    code, out, err = _run(capsys, "eval", "--model", str(exact), "--config", TINY, *FAST)
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["perplexity"] == manifest["score"] == json.loads((run / "summary.json").read_text())["ppl_after"]
    assert row["heldout_tokens"] == 2 * 64 and torch.isfinite(torch.tensor(row["perplexity"]))
