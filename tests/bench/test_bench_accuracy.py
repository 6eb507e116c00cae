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
    for argv, bad in ((["--methods", "fp,nope"], "nope"), (["--bits", "9"], "9"), (["--layers", "0"], "0"),
                      (["--layer-bits", "*.v_proj=9"], "*.v_proj=9"), (["--layer-bits", "*.k_proj"], "*.k_proj")):
        with pytest.raises(SystemExit):
            accuracy.parse_args(argv)
        assert bad in capsys.readouterr().err


def test_tau_mode_flag_reaches_our_rows_config():
    assert accuracy.dkm_config(accuracy.parse_args([]), 4, ["a"]).tau_mode == "global"
    assert accuracy.dkm_config(accuracy.parse_args(["--tau-mode", "gap"]), 3, ["a"]).tau_mode == "gap"
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--tau-mode", "layer"])


def test_layer_bits_give_the_edkm_rows_mixed_widths_and_check_each_layer_at_its_own(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rows.jsonl"
    checks = []
    real = accuracy.peers.count_lut_violations
    monkeypatch.setattr(accuracy.peers, "count_lut_violations",
                        lambda m, names, bits, g: checks.append((bits, real(m, names, 3, g))) or real(m, names, bits, g))
    code = accuracy.main(["--model", "tiny", "--bits", "3", "--steps", "1", "--eval-windows", "2",
                          "--calib-windows", "2", "--seq-len", "16", "--threads", "1", "--methods", "rtn,kmeans,ours",
                          "--layer-bits", "*.v_proj=5, *.k_proj=4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "layer_bits" not in rows["rtn"]  # the other rows stay at --bits
    from edkm.hub.models import tiny_llama

    fp = tiny_llama(hidden=64, layers=2, intermediate=128)  # the bench's tiny model
    names = accuracy.peers.select_linears(fp)
    width = {n: 5 if n.endswith("v_proj") else 4 if n.endswith("k_proj") else 3 for n in names}
    expected = accuracy.quant.bits_per_weight(
        accuracy.quant.lut_storage(tuple(fp.get_submodule(n).weight.shape), width[n], 16) for n in names)
    for method in ("kmeans", "ours_init", "ours"):
        r = rows[method]
        assert r["layer_bits"] == {"*.v_proj": 5, "*.k_proj": 4} and r["lut_violations"] == 0
        assert r["bits_per_weight"] == pytest.approx(expected, rel=1e-9)
    widths = [bits for bits, _ in checks if isinstance(bits, dict)]
    assert len(widths) == 3 and {widths[0][n] for n in widths[0] if n.endswith("v_proj")} == {5}
    assert {widths[0][n] for n in widths[0] if n.endswith(("q_proj", "down_proj"))} == {3}
    assert all(at_3 > 0 for bits, at_3 in checks if isinstance(bits, dict))  # 5-bit layers break a 3-bit check
