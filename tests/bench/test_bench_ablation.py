"""Smoke tests of `bench/ablation.py` with grouped LUTs: rows run, are tagged, and the table
path holds less for backward than the naive (N, K) maps at both granularities."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.ablation import ROWS, lut_groups, measure

REPO = Path(__file__).resolve().parents[2]


def test_script_rows_with_grouped_luts(tmp_path: Path) -> None:
    # One subprocess run (each row runs in a fresh interpreter: seconds each); per-tensor
    # is covered in-process below.
    granularity, groups = "per_grouped_channel", 4
    out = tmp_path / "ablation.json"
    proc = subprocess.run([sys.executable, "-m", "bench.ablation", "--size", "64", "--repeats", "1",
                           "--rows", "naive,+uniquification,+rebuild", "--granularity", granularity, "--group-size", "16",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    rows = {r["technique"]: r for r in json.loads(out.read_text())}
    for r in rows.values():
        assert r["error"] is None, r
        assert (r["granularity"], r["lut_groups"]) == (granularity, groups), r
        assert r["group_size"] == 16
    naive, table = rows["naive"]["device_bytes"], rows["+uniquification"]["device_bytes"]
    assert 0 < table < naive, f"table path holds {table} B, naive {naive} B"
    rebuild = rows["+rebuild"]
    history = groups * 4 * (2 * 3 + 1) * 8 * 4  # four matrices' c_hist and den_hist: G (T + 1 + T) K fp32
    assert rebuild["device_bytes"] == history, rebuild
    assert rebuild["weight_fraction"] == history / (4 * 64 * 64 * 2) < rows["+uniquification"]["weight_fraction"]
    assert f"{groups} LUTs of 16 rows" in proc.stdout


@pytest.mark.parametrize("group_size", [None, 16])
def test_measure_in_process(group_size: int | None) -> None:
    naive = measure(ROWS["naive"], 64, torch.device("cpu"), repeats=1, group_size=group_size)
    table = measure(ROWS["+uniquification"], 64, torch.device("cpu"), repeats=1, group_size=group_size)
    assert 0 < table["device_bytes"] < naive["device_bytes"] and table["seconds"] > 0


@pytest.mark.parametrize("size, group_size", [(64, 3), (64, 0)])
def test_lut_groups_rejects_bad_sizes(size: int, group_size: int) -> None:
    with pytest.raises(ValueError, match=str(group_size)):
        lut_groups(size, group_size)
