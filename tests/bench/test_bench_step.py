"""Smoke tests of `bench/step.py`: the script runs end to end and its JSON is consistent.

Runs the script as users do (a subprocess, ``--quick``: the tiny random LLaMA with the
4-bit preset's DKM settings, one round). Timings are not checked (CI machines are noisy);
the fields, the ratio's arithmetic from the same run, the settings read from the preset,
and that the profile finds every DKM phase are.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.phases import DKM_PHASES, PHASES
from bench.step import DEFAULT_CONFIG, parse_args
from edkm.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
KEYS = {"plain_s", "dkm_s", "ratio", "device", "commit", "torch", "triton", "coremltools", "python",
        "plain_times_s", "dkm_times_s", "bits", "granularity", "group_size", "max_iters", "batch_size",
        "seq_len", "threads", "backend", "clustered_layers", "profile"}


def _run(args: list[str], tmp_path: Path, timeout: float = 120) -> tuple[dict, str]:
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, "-m", "bench.step", "--quick", *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    lines = out.read_text().splitlines()
    assert len(lines) == 1, f"--out must hold one JSON object, got {len(lines)} lines"
    return json.loads(lines[0]), proc.stdout


def test_quick_run_json_and_profile(tmp_path: Path) -> None:
    res, stdout = _run([], tmp_path)
    missing = KEYS - set(res)
    assert not missing, f"missing keys {sorted(missing)}"
    assert res["ratio"] == pytest.approx(res["dkm_s"] / res["plain_s"], rel=1e-12)
    assert res["plain_s"] == statistics.median(res["plain_times_s"]) and len(res["plain_times_s"]) == 1
    assert res["dkm_s"] == statistics.median(res["dkm_times_s"]) and res["dkm_s"] > 0
    assert res["device"] == "cpu" and res["threads"] == 1 and res["commit"]
    preset = load_config(DEFAULT_CONFIG).dkm  # the DKM settings follow the preset file
    assert (res["bits"], res["granularity"], res["group_size"], res["max_iters"]) == (
        preset.bits, preset.granularity, preset.group_size, preset.max_iters)
    assert res["model"] == "tiny" and res["batch_size"] == 2 and res["seq_len"] == 32
    assert res["clustered_layers"] == 14  # 2 decoder layers x 7 linears
    prof = res["profile"]
    assert set(prof["phases"]) == set(PHASES)
    for p in DKM_PHASES[:5]:
        assert prof["phases"][p]["s"] > 0, f"the profile found no {p!r}: {prof['phases']}"
    assert sum(prof["phases"][p]["share_of_dkm"] for p in DKM_PHASES) == pytest.approx(1.0)
    assert prof["dkm_s"] <= prof["total_s"] and prof["idle_threads_s"] >= 0
    assert "ratio dkm/plain" in stdout and "backward replay" in stdout


def test_flags_override_the_preset(tmp_path: Path) -> None:
    res, _ = _run(["--no-profile", "--bits", "3", "--granularity", "per_tensor", "--max-iters", "1",
                   "--rounds", "2", "--importance-windows", "0"], tmp_path)
    assert (res["bits"], res["granularity"], res["group_size"], res["max_iters"]) == (3, "per_tensor", None, 1)
    assert res["importance_windows"] == 0 and res["lut_groups"] == res["clustered_layers"]
    assert len(res["plain_times_s"]) == len(res["dkm_times_s"]) == 2 and res["rounds"] == 2
    assert res["profile"] is None
    assert res["ratio"] == pytest.approx(res["dkm_s"] / res["plain_s"], rel=1e-12)


@pytest.mark.parametrize("argv, bad", [(["--bits", "0"], "0"), (["--rounds", "-2"], "-2"),
                                       (["--importance-windows", "-1"], "-1")])
def test_bad_flags_name_the_value(argv: list[str], bad: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert bad in capsys.readouterr().err
