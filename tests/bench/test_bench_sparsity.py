"""`bench/sparsity.py`: the exact-zero count and window of DKM's map, on hand-computed cases,
and the script end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.sparsity import map_stats

REPO = Path(__file__).resolve().parents[2]


def _table(vals, centroids):
    values = torch.tensor(vals, dtype=torch.float32).view(1, -1, 1)
    counts = torch.ones(1, len(vals))
    return values, counts, torch.tensor(centroids, dtype=torch.float32).view(1, -1, 1)


def test_exact_zeros_and_windows_by_hand():
    # tau 0.01: a centroid 1.5 further than the nearest one is exp(-200) -> 0 in fp32
    values, counts, c = _table([0.5, 1.5, 5.9, 2.0, 2.05], [0.0, 1.0, 2.0, 10.0])
    s = map_stats(values, counts, c, 0.01)
    # 0.5 sits between 0 and 1; 5.9 is 160 nats nearer 2 than 10; at 2.0 the centroid 1 is
    # 100 nats down, exp(-100) = 3.7e-44 is a denormal, not 0; at 2.05 it is 110 nats: 0
    assert s["nonzero"].tolist() == [2, 2, 1, 2, 1]
    assert s["window"].tolist() == [2, 2, 1, 2, 1]
    shuffled = map_stats(values, counts, c[:, [3, 0, 2, 1]], 0.01)  # sorted order is the window's order
    assert shuffled["window"].tolist() == s["window"].tolist()
    wide = map_stats(values, counts, c, 100.0)  # a hot softmax: nothing underflows
    assert wide["nonzero"].tolist() == [4] * 5 and wide["window"].tolist() == [4] * 5


def test_padding_rows_are_not_counted():
    values, counts, c = _table([0.5, 0.0, 1.5], [0.0, 1.0, 2.0, 10.0])
    counts[0, 1] = 0  # a padding row
    assert map_stats(values, counts, c, 0.01)["nonzero"].tolist() == [2, 2]


def test_script_quick(tmp_path):
    out = tmp_path / "s.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.sparsity", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["layer"] for r in rows]
    assert kinds[-1] == "all" and {"q_proj", "down_proj"} <= set(kinds)
    total = rows[-1]
    assert total["rows"] == sum(r["rows"] for r in rows[:-1]) and total["layers"] == 14
    # the main preset: k_proj / v_proj at 5 bits (dkm.layers), the rest at 4
    assert {r["layer"]: r["K"] for r in rows} == {**{r["layer"]: 16 for r in rows}, "k_proj": 32, "v_proj": 32,
                                                  "all": 32}
    for r in rows:
        assert 0 <= r["zero_fraction"] < 1 and 1 <= r["window_mean"] <= r["window_max"] <= r["K"]
    for r in rows[:-1]:  # one K per layer kind
        assert abs(r["nonzero_per_row"] - r["K"] * (1 - r["zero_fraction"])) < 1e-9
    entries = sum(r["rows"] * r["K"] for r in rows[:-1])  # 'all': zeros over every layer's own entries
    nonzero = sum(r["rows"] * r["nonzero_per_row"] for r in rows[:-1])
    assert abs(total["zero_fraction"] - (1 - nonzero / entries)) < 1e-9
