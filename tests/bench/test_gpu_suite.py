"""The GPU suite cannot rot: its --dry-run (same steps, tiny shapes, CPU) passes in CI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import gpu_suite

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_passes_every_step(tmp_path):
    res = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=1800, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [s.name for s in gpu_suite.gpu_steps()]  # the dry run mirrors the GPU steps
    assert summary["failed"] == []
    want_skipped = [] if importlib.util.find_spec("bench.step") else ["step"]
    assert summary["skipped"] == want_skipped
    assert steps["fsdp"]["result"]["ok"] and steps["fsdp"]["result"]["backend"] == "gloo"
    assert steps["offload"]["result"]["ok"] and steps["offload"]["result"]["bytes_to_host"] > 0
    assert {r["case"] for r in steps["scale"]["result"]["rows"]} == {"plain", "per_tensor"}
    assert "[suite] env: PASSED" in (tmp_path / "suite.log").read_text()
    with tarfile.open(tmp_path / "steps.tar.gz") as tar:
        names = set(tar.getnames())
    ran = [n for n, s in steps.items() if s["status"] == "passed"]
    assert {f"steps/{n}.log" for n in ran} <= names
    assert len(list(tmp_path.iterdir())) <= 8  # what the GPU machine returns from $OUT


def test_gpu_steps_fit_the_eight_minute_budget():
    steps = gpu_suite.gpu_steps()
    assert sum(s.timeout_s for s in steps) <= gpu_suite.BUDGET_S <= 480
    for s in steps:  # every module a step runs exists, or the step says what it needs
        if s.argv[0] == "-m" and s.needs is None:
            assert importlib.util.find_spec(s.argv[1]) is not None, s.argv[1]


def test_a_failing_or_hanging_step_is_recorded(tmp_path):
    bad = gpu_suite.run_step(gpu_suite.Step("bad", ("-c", "raise SystemExit(3)"), 30), tmp_path, 30)
    assert bad["status"] == "failed" and bad["rc"] == 3
    slow = gpu_suite.run_step(gpu_suite.Step("slow", ("-c", "import time; time.sleep(60)"), 6), tmp_path, 6)
    assert slow["status"] == "timeout" and slow["seconds"] < 30
    missing = gpu_suite.run_step(gpu_suite.Step("m", ("-m", "x"), 5, needs="bench.no_such_module"), tmp_path, 5)
    assert missing["status"] == "skipped" and "bench.no_such_module" in missing["reason"]


def test_gpu_mode_without_cuda_refuses_and_unknown_steps_are_named(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        gpu_suite.main([])
    assert "--dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dry-run", "--only", "nope"])
    assert "['nope']" in capsys.readouterr().err
