"""bench/accuracy.py: its RTN baseline, and a smoke run of the whole bench on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from bench import accuracy


def test_rtn_uses_evenly_spaced_levels_from_min_to_max_per_group():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(10, 8, bias=False))
    with torch.no_grad():
        model.lin.weight.copy_(torch.randn(8, 10, generator=gen))
    w0 = model.lin.weight.detach().clone()
    accuracy.rtn_(model, ["lin"], bits=2, group_size=4)
    for g in range(2):
        before, after = w0[4 * g : 4 * g + 4].flatten(), model.lin.weight[4 * g : 4 * g + 4].flatten()
        lo, hi = before.min(), before.max()
        levels = lo + (hi - lo) * torch.arange(4) / 3
        assert torch.unique(after).numel() <= 4
        nearest = levels[(before[:, None] - levels[None]).abs().argmin(1)]
        torch.testing.assert_close(after, nearest, rtol=0, atol=1e-6)


def test_bench_runs_on_a_tiny_model_and_writes_checked_rows(tmp_path, capsys):
    pytest.importorskip("coremltools")
    out = tmp_path / "rows.jsonl"
    code = accuracy.main(["--model", "tiny", "--bits", "3", "--steps", "2", "--eval-windows", "2",
                          "--calib-windows", "2", "--seq-len", "16", "--threads", "1",
                          "--methods", "fp,fp_finetune,rtn,kmeans,ct_ptq,ours", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["fp", "fp_finetune", "rtn", "kmeans", "ct_ptq", "ours_init", "ours"]
    for r in rows:
        assert "error" not in r and r["ppl"] > 1 and r["train_tokens"] == 2 * 4 * 16
        assert r["domains"] == ["heldout", "wiki"]
        for d in r["domains"]:  # every row scored on every domain against the float model
            assert r[f"{d}_ppl"] > 1 and 0 <= r[f"{d}_top1"] <= 1 and r[f"{d}_kl"] >= 0
        assert r["ppl"] == r["heldout_ppl"] and r["ppl_vs_fp"] == r["heldout_x_fp"]
        if r["bits"] is not None:
            assert r["lut_violations"] == 0 and r["layers_clustered"] == 14
            assert 3 < r["bits_per_weight"] < 3.5  # 3-bit codes + small-layer LUTs
    assert rows[0]["wiki_kl"] == 0 and rows[0]["wiki_top1"] == 1 and rows[0]["bits_per_weight"] is None
    assert len(rows[-1]["train_log"]) == 2
    assert "ours" in capsys.readouterr().out  # the printed table


def test_bad_arguments_are_errors_naming_the_value(capsys):
    for argv, bad in ((["--methods", "fp,nope"], "nope"), (["--bits", "9"], "9"), (["--layers", "0"], "0")):
        with pytest.raises(SystemExit):
            accuracy.parse_args(argv)
        assert bad in capsys.readouterr().err


def test_tau_mode_flag_reaches_our_rows_config():
    assert accuracy.dkm_config(accuracy.parse_args([]), 4, ["a"]).tau_mode == "global"
    assert accuracy.dkm_config(accuracy.parse_args(["--tau-mode", "gap"]), 3, ["a"]).tau_mode == "gap"
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--tau-mode", "layer"])
