"""bench/accuracy_quant.py: bits-per-weight accounting by hand, and the HQQ / GPTQ adapters on a tiny model."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import edkm
from bench import accuracy
from bench.accuracy_peers import select_linears
from bench.accuracy_quant import (
    Storage,
    bits_per_weight,
    count_group_violations,
    gptq_,
    hqq_,
    lut_storage,
    model_lut_storage,
    row_range_storage,
)
from edkm.hub.models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model():
    return tiny_llama(hidden=64, layers=2, intermediate=128)  # every width divisible by 64


def _windows(n, seed=0):
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- bits per weight


def test_bits_per_weight_by_hand():
    # 576 x 576 at 4 bits, one 16-entry fp16 LUT per 16 rows: 36 LUTs x 16 x 16 bits over 331,776 weights
    assert bits_per_weight([lut_storage((576, 576), 4, 16)]) == pytest.approx(4 + 9216 / 331776)  # 4.02778
    # HQQ group 64: fp16 scale + fp16 zero per 64 weights
    assert bits_per_weight([Storage(576 * 576, 4, 576 * 576 // 64 * 32)]) == 4.5
    # rtn: fp16 min + step per 16 rows of 576
    assert bits_per_weight([row_range_storage((576, 576), 3, 16)]) == pytest.approx(3 + 36 * 32 / 331776)
    # codes round up to whole bytes per layer: 5 codes x 3 bits = 15 bits -> 2 bytes
    assert bits_per_weight([Storage(5, 3, 0)]) == 16 / 5
    # layers are pooled by weight count, not averaged: (100 * 4 + 800) / 100 and 300 * 4 + 0
    assert bits_per_weight([Storage(100, 4, 800), Storage(300, 4, 0)]) == (400 + 800 + 1200) / 400
    with pytest.raises(ValueError, match=r"\[\]"):
        bits_per_weight([])


def test_lut_storage_of_finalized_model_equals_the_exported_bytes(tmp_path):
    model = _model()
    names = select_linears(model)
    cfg = edkm.DKMConfig(bits=3, granularity="per_grouped_channel", group_size=16, include=tuple(names),
                         min_weight_numel=0)
    edkm.prepare(model, cfg)
    edkm.finalize(model)
    sizes = edkm.export_compressed(model, tmp_path / "m.edkm.safetensors")
    numel = sum(math.prod(model.get_submodule(n).weight_shape) for n in names)
    exported = 8 * (sizes["codes"] + sizes["luts"]) / numel
    got = bits_per_weight(model_lut_storage(model, names))
    assert got == pytest.approx(exported, rel=1e-12)
    assert got == pytest.approx(bits_per_weight(lut_storage(model.get_submodule(n).weight_shape, 3, 16)
                                                for n in names), rel=1e-12)
    with pytest.raises(TypeError, match="not a finalized LUT layer"):
        model_lut_storage(_model(), names[:1])


def test_count_group_violations_flat_and_per_row():
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(8, 2, bias=False))
    with torch.no_grad():  # row 0: 2 values per 4 columns; row 1: 4 distinct values in columns 0..3
        model.lin.weight.copy_(torch.tensor([[0., 0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 3, 5, 5, 5, 5]]))
    assert count_group_violations(model, ["lin"], bits=1, group_size=4) == 1  # only [0,1,2,3] holds > 2
    assert count_group_violations(model, ["lin"], bits=2, group_size=4) == 0
    assert count_group_violations(model, ["lin"], bits=2, group_size=8, flat=True) == 1  # row 1 holds 5 > 4 values


# ----------------------------------------------------------------------------- adapters


def _check_adapter(quantise, bits, group, flat):
    model = _model()
    names = select_linears(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_group_violations(model, names, bits, group, flat=flat) > 0  # random weights

    storage = quantise(model, names)

    assert count_group_violations(model, names, bits, group, flat=flat) == 0
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in names)
    after = model.state_dict()
    assert list(after) == list(before)  # no scale / zero parameters left behind
    selected = {f"{n}.weight" for n in names}
    for key, value in before.items():
        if key in selected:
            rel = (after[key] - value).norm() / value.norm()
            # quantised, and close: a uniform grid over +-3 sigma has relative RMS error ~1.7 / 2**bits;
            # GPTQ's error feedback moves weights further (measured 0.41 at 3 bits): bound 4 / 2**bits
            assert 0 < rel < 4 / 2**bits, (key, rel)
        else:
            assert torch.equal(after[key], value), key  # embeddings, norms untouched
    batch = _windows(2, seed=1)
    with torch.no_grad():
        assert math.isfinite(float(model(input_ids=batch, labels=batch).loss))
    return storage


@pytest.mark.parametrize("bits", [4, 3])
def test_hqq_quantises_only_the_named_layers(bits):
    pytest.importorskip("hqq", reason="hqq not installed (pip install -e .[peers])")
    storage = _check_adapter(lambda m, names: hqq_(m, names, bits, 64), bits, 64, flat=True)
    assert bits_per_weight(storage) == bits + 0.5  # fp16 scale + zero per 64 weights


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_quantises_only_the_named_layers(bits):
    pytest.importorskip("llmcompressor", reason="llmcompressor not installed (pip install -e .[peers])")
    storage = _check_adapter(lambda m, names: gptq_(m, names, bits, 64, _windows(4)), bits, 64, flat=False)
    assert bits_per_weight(storage) == bits + 0.25  # symmetric: one fp16 scale per 64 columns


def test_gptq_group_that_does_not_divide_is_named():
    pytest.importorskip("llmcompressor", reason="llmcompressor not installed (pip install -e .[peers])")
    model = tiny_llama(hidden=64, layers=1, intermediate=96)
    with pytest.raises(ValueError, match="group_size=64 does not divide model.layers.0.mlp.down_proj's 96"):
        gptq_(model, select_linears(model), 4, 64, _windows(2))


def test_missing_peer_package_is_an_error_row(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.split(".")[0] in ("hqq", "llmcompressor")] + ["hqq", "llmcompressor"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing them now raises ImportError
    code = accuracy.main(["--model", "tiny", "--bits", "4", "--eval-windows", "2", "--calib-windows", "2",
                          "--seq-len", "16", "--threads", "1", "--methods", "fp,hqq,gptq", "--peer-groups", "64",
                          "--out", str(tmp_path / "rows.jsonl")])
    assert code == 1
    rows = [__import__("json").loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["fp", "hqq_g64", "gptq_g64"]
    assert "pip install -e .[peers]" in rows[1]["error"] and "llmcompressor" in rows[2]["error"]


# ----------------------------------------------------------------------------- top-k bench


def test_topk_bench_measures_a_converging_loss(tmp_path, capsys):
    from bench import accuracy_topk

    vocab = 64
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 5, vocab, generator=gen) * 3
    student = teacher + torch.randn(3, 5, vocab, generator=gen)
    rows = accuracy_topk.measure(student, teacher, [1, 8, vocab])
    assert [r["k"] for r in rows] == [1, 8, vocab]
    assert rows[0]["mass"] < rows[1]["mass"] < rows[2]["mass"] == pytest.approx(1.0)
    assert rows[2]["loss"] == pytest.approx(rows[2]["full_loss"], rel=1e-5)
    assert rows[2]["cosine"] == pytest.approx(1.0, abs=1e-5) and rows[1]["cosine"] > rows[0]["cosine"]
    ce = F.cross_entropy(student.flatten(0, 1), teacher.argmax(-1).flatten())  # k = 1: CE to the teacher's argmax
    assert rows[0]["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert accuracy_topk.main(["--model", "tiny", "--ks", "4,256", "--windows", "2", "--seq-len", "8",
                               "--out", str(tmp_path / "r.jsonl")]) == 0
    assert "cosine" in capsys.readouterr().out and len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
