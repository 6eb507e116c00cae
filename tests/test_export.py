"""Exports that cannot lie: no non-finite or out-of-fp16-range values, a payload digest
verified on load, and errors naming the path for truncated, corrupt or foreign files."""

from __future__ import annotations

import json
import logging
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import edkm
from edkm import export as export_mod
from edkm.export import export_compressed, load_compressed, payload_sha256
from edkm.hub.models import tiny_llama


def _finalized():
    model = tiny_llama(vocab_size=256, hidden=64, layers=1)
    edkm.prepare(model, edkm.DKMConfig(bits=3, min_weight_numel=1024))
    return edkm.finalize(model.eval())


def test_digest_catches_flipped_bytes_and_names_the_path(tmp_path):
    path = tmp_path / "m.edkm.safetensors"
    export_compressed(_finalized(), path)
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        want = load_compressed(path)(ids).logits
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-200:-136] = bytes(b ^ 0xFF for b in flipped[-200:-136])  # 64 bytes of the tensor payload
    path.write_bytes(bytes(flipped))
    assert path.stat().st_size == len(good)
    with pytest.raises(ValueError, match=f"{path} is corrupt: its tensor payload does not match the sha256"):
        load_compressed(path)
    path.write_bytes(good)
    with torch.no_grad():
        assert torch.equal(load_compressed(path)(ids).logits, want)


def test_digest_is_over_names_dtypes_shapes_and_bytes():
    a = {"x": torch.zeros(4), "y": torch.ones(2, dtype=torch.int8)}
    assert payload_sha256(a) == payload_sha256(dict(reversed(list(a.items()))))  # key order does not matter
    assert payload_sha256(a) != payload_sha256({"x": torch.zeros(2, 2), "y": a["y"]})
    assert payload_sha256(a) != payload_sha256({"x": torch.zeros(4, dtype=torch.float16), "y": a["y"]})
    assert payload_sha256(a) != payload_sha256({"z": a["x"], "y": a["y"]})


def test_truncated_and_foreign_files_name_the_path(tmp_path):
    path = tmp_path / "m.edkm.safetensors"
    export_compressed(_finalized(), path)
    cut = tmp_path / "cut.edkm.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{cut} is not a readable safetensors file \\(truncated"):
        load_compressed(cut)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a model")
    with pytest.raises(ValueError, match=f"{text} is not a readable safetensors file"):
        load_compressed(text)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(ValueError, match=f"{plain} is not an edkm export \\(no 'edkm' metadata\\)"):
        load_compressed(plain)


def test_files_without_a_digest_load_with_a_warning(tmp_path, caplog):
    path = tmp_path / "m.edkm.safetensors"
    export_compressed(_finalized(), path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["edkm"])
    del meta["sha256"]
    old = tmp_path / "old.edkm.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"edkm": json.dumps(meta)})
    with caplog.at_level(logging.WARNING, logger="edkm.export"):
        load_compressed(old)
    assert f"{old} carries no payload digest" in caplog.text


def test_non_finite_values_are_refused_naming_the_tensor(tmp_path):
    model = _finalized()
    with torch.no_grad():
        model.model.norm.weight[1] = float("nan")
    with pytest.raises(ValueError, match="cannot export model.norm.weight: it holds non-finite values"):
        export_compressed(model, tmp_path / "m.edkm.safetensors")
    assert not list(tmp_path.iterdir())


def test_fp16_overflow_is_refused_naming_layer_and_max_value(tmp_path):
    model = _finalized()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = 4.5e6
    with pytest.raises(ValueError, match=r"cannot export model.layers.0.input_layernorm.weight as float16: "
                                         r"max \|value\| 4.5e\+06 exceeds the float16 range \(65504\)"):
        export_compressed(model, tmp_path / "m.edkm.safetensors")
    export_compressed(model, tmp_path / "m32.edkm.safetensors", dense_dtype=torch.float32)  # in range there
    reloaded = load_compressed(tmp_path / "m32.edkm.safetensors")
    assert reloaded.model.layers[0].input_layernorm.weight[0].item() == 4.5e6


def test_missing_directory_and_failed_writes_leave_no_file(tmp_path, monkeypatch):
    model = _finalized()
    with pytest.raises(FileNotFoundError, match=f"directory '{tmp_path / 'nope'}' does not exist"):
        export_compressed(model, tmp_path / "nope" / "m.edkm.safetensors")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(100, 90, 10))

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "save_file", full)
    out = tmp_path / "m.edkm.safetensors"
    with pytest.raises(OSError, match=rf"could not write export {out}: .*No space left on device "
                                      r"\(needs about \d+ bytes, 10 bytes free; no space left on the device\)"):
        export_compressed(model, out)
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary
