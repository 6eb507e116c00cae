"""Smoke tests of `bench/speed.py`: the script runs end to end and writes well-formed rows.

Runs the script as users do (a subprocess, `--quick`: one 256 x 256 bf16 weight, one
round), so import-path, CLI and JSON-writing bugs show up here. Timings are not checked
(CI machines are noisy); the structure of the rows and the numerics of the naive case
against the table case are.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ENV_KEYS = {"device", "device_name", "torch", "triton", "coremltools", "git_commit", "host", "date"}
ROW_KEYS = {"bench", "case", "status", "median_s", "min_s", "n", "size", "bits", "k", "dtype", "iters", "tau",
            "speedup_vs_coreml", "speedup_vs_naive", "peak_bytes", "memory_method", "max_abs_diff_rel"} | ENV_KEYS
# The naive and table paths compute the same fp32 math and round once to bf16, so they
# may differ by at most one bf16 ulp of a value in [min W, max W]: 2**-7 of max |W|.
BF16_ULP = 2.0**-7


def _run(args: list[str], tmp_path: Path, timeout: float = 50) -> list[dict]:
    out = tmp_path / "speed.jsonl"
    proc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "case" in proc.stdout and "median_s" in proc.stdout, "the table was not printed"
    return rows


def test_quick_run_writes_rows(tmp_path: Path) -> None:
    # Peak memory (fresh child processes, ~10 s more) is covered by the test below.
    rows = _run(["bench/speed.py", "--quick", "--no-memory"], tmp_path)
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"edkm", "edkm_torch", "edkm_naive", "coremltools"}, sorted(by_case)
    for r in rows:
        missing = ROW_KEYS - set(r)
        assert not missing, f"{r['case']}: missing keys {sorted(missing)}"
        assert r["bench"] == "speed" and r["size"] == 256 and r["dtype"] == "bf16" and r["k"] == 8
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r["status"]
    for name in ("edkm", "edkm_torch", "edkm_naive"):
        r = by_case[name]
        assert r["status"] == "ok", f"{name}: {r['status']}"
        assert r["n"] == 1 and r["median_s"] > 0 and r["min_s"] <= r["median_s"], r
    assert by_case["edkm_naive"]["speedup_vs_naive"] == pytest.approx(1.0)
    assert by_case["edkm"]["max_abs_diff_rel"] == 0.0
    for name in ("edkm_naive", "edkm_torch"):  # against edkm (the C kernels here)
        diff = by_case[name]["max_abs_diff_rel"]
        assert diff <= BF16_ULP, f"{name} vs table path differ by {diff:.3g} of max|W| (> one bf16 ulp)"
    coreml = by_case["coremltools"]
    if coreml["status"] == "ok":
        assert coreml["median_s"] > 0 and math.isfinite(coreml["max_abs_diff_rel"])
        assert by_case["edkm"]["speedup_vs_coreml"] > 0


def test_missing_coremltools_is_a_skipped_row_and_memory_is_measured(tmp_path: Path) -> None:
    # sys.modules[name] = None makes `import coremltools...` raise ImportError.
    code = ("import sys; sys.modules['coremltools'] = None; from bench.speed import main; "
            "sys.exit(main(sys.argv[1:]))")
    rows = _run(["-c", code, "--size", "64", "--repeats", "1", "--memory"], tmp_path)
    by_case = {r["case"]: r for r in rows}
    assert by_case["coremltools"]["status"].startswith("skipped: coremltools unusable ("), by_case
    assert by_case["coremltools"]["median_s"] is None
    assert by_case["edkm"]["status"] == "ok" and by_case["edkm"]["speedup_vs_coreml"] is None
    for name in ("edkm", "edkm_naive"):
        r = by_case[name]
        assert "isolated process" in r["memory_method"], r["memory_method"]
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0, r


def test_grouped_luts_in_every_case(tmp_path: Path) -> None:
    rows = _run(["-m", "bench.speed", "--quick", "--no-memory", "--granularity", "per_grouped_channel",
                 "--group-size", "16"], tmp_path)
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        assert (r["granularity"], r["group_size"], r["groups"]) == ("per_grouped_channel", 16, 256 // 16), r
    assert by_case["edkm"]["status"] == by_case["edkm_naive"]["status"] == "ok"
    diff = by_case["edkm_naive"]["max_abs_diff_rel"]
    assert diff <= BF16_ULP, f"grouped naive vs table path differ by {diff:.3g} of max|W| (> one bf16 ulp)"
    coreml = by_case["coremltools"]
    if importlib.util.find_spec("coremltools") is not None:  # installed: it must run, configured the same way
        assert coreml["status"] == "ok", coreml["status"]
        assert coreml["coremltools_config"].startswith("per_grouped_channel, group_size=16"), coreml
        assert math.isfinite(coreml["max_abs_diff_rel"]) and by_case["edkm"]["speedup_vs_coreml"] > 0


def test_one_group_of_all_rows_is_the_per_tensor_problem() -> None:
    # One group of all rows is the per-tensor problem: same C0, same soft weight.
    from bench.speed import make_problem, parse_args

    a = parse_args(["--size", "64"])
    b = parse_args(["--size", "64", "--granularity", "per_grouped_channel", "--group-size", "64"])
    wa, ga, ca = make_problem(a, torch.device("cpu"))
    wb, gb, cb = make_problem(b, torch.device("cpu"))
    assert ca.shape == cb.shape == (1, 8, 1) and torch.equal(ca, cb) and torch.equal(wa, wb)
    c = make_problem(parse_args(["--size", "64", "--granularity", "per_grouped_channel"]), torch.device("cpu"))[2]
    assert c.shape == (4, 8, 1)  # default group size 16: one LUT per 16 of the 64 rows


@pytest.mark.parametrize("argv, bad", [(["--granularity", "per_grouped_channel", "--group-size", "3"], "3"),
                                       (["--group-size", "0"], "0")])
def test_bad_group_size_names_the_value(argv: list[str], bad: str, capsys: pytest.CaptureFixture) -> None:
    from bench.speed import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--size", "64", *argv])
    assert bad in capsys.readouterr().err
