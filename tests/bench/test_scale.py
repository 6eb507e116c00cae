"""bench.scale: the quick run's rows and plan, the plan's arithmetic, the coremltools cap ladder."""

from __future__ import annotations

import json

import pytest

from bench import scale
from bench.scale_plan import GIB, LAYERS, VOCAB, memory_plan


def _layer_params(h: int, i: int) -> int:
    return 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms


def test_quick_run_writes_rows_and_plan(tmp_path):
    out = tmp_path / "scale.json"
    assert scale.main(["--quick", "--cases", "plain", "per_grouped_channel", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] and data["env"]["device"] == "cpu" and data["env"]["git_commit"]
    rows = {r["case"]: r for r in data["rows"]}
    assert set(rows) == {"plain", "per_grouped_channel"}
    q = scale.QUICK
    for r in rows.values():
        assert "error" not in r, r
        assert r["n_params"] == _layer_params(q["hidden"], q["intermediate"])
        assert r["seconds"] > 0 and r["peak_process"] > 0
    assert rows["per_grouped_channel"]["bits"] == 3 and rows["plain"]["bits"] is None
    assert len(data["plan"]) == 5 and all(p["shape_only"] for p in data["plan"])


def _rows(p_layer: int, a_plain: int, a_dkm: int, t: int) -> list[dict]:
    base = {"n_params": p_layer, "memory_method": "test"}
    return [{**base, "case": "plain", "held_after_forward": a_plain, "peak_backward": a_plain + 4 * p_layer + t},
            {**base, "case": "per_tensor", "bits": 3, "held_after_forward": a_dkm // 2,
             "peak_backward": a_dkm // 2 + 4 * p_layer},
            {**base, "case": "per_grouped_channel", "bits": 3, "held_after_forward": a_dkm,
             "peak_backward": a_dkm + 4 * p_layer + t}]


def test_memory_plan_arithmetic():
    h, p_layer, a_plain, a_dkm, t = 4096, 202_383_360, 10**9, 3 * 10**9, 5 * 10**8
    plan = {r["setup"]: r for r in memory_plan(_rows(p_layer, a_plain, a_dkm, t), {"hidden": h, "seq": 512})}
    p_total = LAYERS * p_layer + 2 * VOCAB * h + h
    logits = 3 * 512 * VOCAB * 4
    one = plan["1 GPU, DKM 3-bit per_grouped_channel, fp32 AdamW"]  # the costlier granularity is planned
    assert one["per_gpu_gib"] == pytest.approx((16 * p_total + LAYERS * a_dkm + t + logits) / GIB)
    assert not one["fits_80gb"]  # 16 B x 6.7e9 params alone is 108 GB
    plain = plan["1 GPU, plain layer, fp32 AdamW"]
    assert plain["per_gpu_gib"] == pytest.approx((16 * p_total + LAYERS * a_plain + t + logits) / GIB)
    eight = next(r for s, r in plan.items() if s.startswith("8 GPUs"))
    in_flight = 12 * p_layer + 8 * 2 * VOCAB * h
    assert eight["per_gpu_gib"] == pytest.approx(
        (16 * p_total // 8 + 2 * p_total // 8 + in_flight + LAYERS * a_dkm + t + logits) / GIB)
    for r in plan.values():  # every row's total is the sum of its named terms
        gpu_terms = sum(v for k, v in r["terms"].items() if not k.startswith("host "))
        assert gpu_terms == pytest.approx(r["per_gpu_gib"]) and r["measured"] and r["scaled"]


def test_memory_plan_needs_plain_and_a_dkm_row():
    rows = _rows(10, 1, 2, 0)
    assert memory_plan(rows[:1], {"hidden": 8, "seq": 4}) == []
    assert memory_plan(rows[1:], {"hidden": 8, "seq": 4}) == []


def test_coremltools_failure_under_every_cap_is_reported():
    args = scale.parse_args(["--quick", "--cases", "coremltools", "--caps", "0.05", "0.06"])
    (row,) = scale.run_all(args)
    assert row["caps_tried_gib"] == [0.05, 0.06]
    assert row["error"].startswith("failed under every cap tried ([0.05, 0.06] GiB)")


def _fake_child(need_gib: float, timeout_below: float = 0.0):
    """run_isolated stand-in: the step fits under caps >= need_gib, times out below timeout_below."""
    def run(argv, timeout_s):
        cap = float(argv[argv.index("--cap-gib") + 1])
        if cap < timeout_below:
            return {"error": f"timed out after {timeout_s:g} s"}
        if cap < need_gib:
            return {"error": "out of memory under cap: MemoryError"}
        return {"case": "coremltools", "cap_gib": cap, "peak_process": 1}
    return run


def test_coremltools_cap_is_bisected_to_the_resolution(monkeypatch):
    monkeypatch.setattr(scale, "run_isolated", _fake_child(need_gib=2.3))
    args = scale.parse_args(["--cases", "coremltools", "--caps", "1", "4", "--cap-resolution", "0.5"])
    (row,) = scale.run_all(args)
    assert row["caps_tried_gib"] == [1, 4, 2.5, 1.75, 2.125]  # 1 fails, 4 fits; bisect (1, 4] to 0.5 GiB
    assert row["needed_cap_gib"] == {"fails_at": 2.125, "fits_at": 2.5} and row["cap_gib"] == 2.5
    assert "error" not in row


def test_a_timed_out_try_ends_the_cap_search(monkeypatch):
    monkeypatch.setattr(scale, "run_isolated", _fake_child(need_gib=2.3, timeout_below=3.0))
    args = scale.parse_args(["--cases", "coremltools", "--caps", "4", "--cap-resolution", "0.5"])
    (row,) = scale.run_all(args)
    assert row["caps_tried_gib"] == [4, 2.0]  # 2 GiB timed out: says nothing about memory, stop
    assert row["needed_cap_gib"] == {"fails_at": None, "fits_at": 4}
    assert "not a memory failure" in row["cap_tries"][1]["outcome"]


def test_shrink_divides_the_7b_shapes_or_names_them():
    assert scale.layer_dims(False, 4) == {"hidden": 1024, "intermediate": 2752, "heads": 8, "seq": 512, "shrink": 4}
    with pytest.raises(ValueError, match=r"--shrink 3 does not divide \{'hidden': 4096, 'intermediate': 11008"):
        scale.layer_dims(False, 3)


@pytest.mark.parametrize("argv,bad", [(["--bits", "9"], "--bits 9"), (["--iters", "0"], "--iters 0"),
                                      (["--caps", "0"], "--caps 0.0"), (["--shrink", "0"], "--shrink 0"),
                                      (["--cap-resolution", "-1"], "--cap-resolution -1.0")])
def test_bad_arguments_name_the_value(argv, bad, capsys):
    with pytest.raises(SystemExit):
        scale.parse_args(argv)
    assert bad in capsys.readouterr().err
