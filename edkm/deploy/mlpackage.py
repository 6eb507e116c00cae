"""Read an ``.mlpackage`` back without Core ML: its MIL program and its weight blob.

Core ML cannot run on Linux, so `edkm.deploy.coreml` is checked by reading what it wrote:
the program (``Data/com.apple.CoreML/model.mlmodel``, a protobuf parsed with coremltools'
generated ``Model_pb2``) and the weights (``weights/weight.bin``) parsed here by hand, so a
check does not trust the writer's own reader. Blob file layout (MIL blob storage v2, read
off real files): a 64-byte header (uint32 blob count, uint32 version = 2), then per blob a
64-byte record (uint32 sentinel 0xDEADBEEF, uint32 dtype code, uint64 byte size, uint64
data offset) followed by the data, each 64-byte aligned. Sub-byte integers (uint1..uint6)
are packed little-endian, element i in bits ``[i*b, (i+1)*b)`` of the stream: the same
layout as `edkm.functional.packing.pack_codes` (one row), so 3-bit Core ML indices are edkm's codes byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edkm.functional.packing import unpack_codes

SENTINEL = 0xDEADBEEF
_FLOATS = {"FLOAT16": np.float16, "FLOAT32": np.float32}


@dataclass
class BlobRef:
    """A tensor stored in ``weight.bin``: proto data type, shape, and record offset."""

    dtype: str  # proto DataType name: FLOAT16, UINT3, ...
    shape: tuple[int, ...]
    offset: int


@dataclass
class Op:
    """One MIL operation: type, output names, and per input the argument names or blobs."""

    type: str
    outputs: list[str]
    inputs: dict[str, list[str | BlobRef]] = field(default_factory=dict)


class MLPackage:
    """An ``.mlpackage`` read back: ``functions`` {name: [Op]}, ``blob(ref)`` -> ndarray.

    Args:
        path: The ``.mlpackage`` directory.
    """

    def __init__(self, path: str | Path) -> None:
        from coremltools.proto import MIL_pb2, Model_pb2

        root = Path(path) / "Data" / "com.apple.CoreML"
        if not (root / "model.mlmodel").is_file():
            raise FileNotFoundError(f"{str(path)!r} is not an .mlpackage (no {root / 'model.mlmodel'})")
        spec = Model_pb2.Model()
        spec.ParseFromString((root / "model.mlmodel").read_bytes())
        self.spec = spec
        self.weight_file = root / "weights" / "weight.bin"
        self._raw = self.weight_file.read_bytes() if self.weight_file.is_file() else b""
        names = MIL_pb2.DataType.Name
        self.functions: dict[str, list[Op]] = {}
        for fname, fn in spec.mlProgram.functions.items():
            ops = []
            for op in fn.block_specializations[fn.opset].operations:
                cur = Op(op.type, [o.name for o in op.outputs])
                for key, arg in op.inputs.items():
                    cur.inputs[key] = [_binding(b, names) for b in arg.arguments]
                if op.type == "const" and "val" in op.attributes:
                    cur.inputs["val"] = [_value(op.attributes["val"], names)]
                ops.append(cur)
            self.functions[fname] = ops

    def blob_records(self) -> list[tuple[int, int, int, int]]:
        """Every blob record in file order: ``(record offset, dtype code, bytes, data offset)``."""
        count, version = struct.unpack_from("<II", self._raw, 0)
        if version != 2:
            raise ValueError(f"{self.weight_file}: blob storage version {version}, expected 2")
        out, pos = [], 64
        for _ in range(count):
            sentinel, code, size, data = struct.unpack_from("<IIQQ", self._raw, pos)
            if sentinel != SENTINEL:
                raise ValueError(f"{self.weight_file}: bad blob record at byte {pos}")
            out.append((pos, code, size, data))
            pos = data + size + (-(data + size)) % 64
        return out

    def blob_bytes(self, ref: BlobRef) -> np.ndarray:
        """The stored bytes of one blob (uint8, packed as on disk)."""
        sentinel, _, size, data = struct.unpack_from("<IIQQ", self._raw, ref.offset)
        if sentinel != SENTINEL:
            raise ValueError(f"{self.weight_file}: no blob record at byte {ref.offset}")
        return np.frombuffer(self._raw, np.uint8, count=size, offset=data)

    def blob(self, ref: BlobRef) -> np.ndarray:
        """Decode one blob to an ndarray of ``ref.shape`` (sub-byte integers unpacked to uint8)."""
        raw = self.blob_bytes(ref)
        numel = int(np.prod(ref.shape))
        if ref.dtype in _FLOATS:
            return raw.view(_FLOATS[ref.dtype]).reshape(ref.shape)
        if ref.dtype.startswith("UINT"):
            bits = int(ref.dtype[4:])
            if bits == 8:
                return raw.reshape(ref.shape)
            codes = unpack_codes(torch.from_numpy(raw.copy()).unsqueeze(0), bits, numel)[0]  # one row
            return codes.numpy().reshape(ref.shape)
        raise ValueError(f"blob dtype {ref.dtype} not handled by this reader")

    def lut_ops(self, function: str) -> list[dict[str, Any]]:
        """The ``constexpr_lut_to_dense`` ops of a function, decoded.

        Returns:
            Per op: ``name``, ``bits``, ``indices`` (uint8 array), ``lut`` (G, 1, K, d),
            ``weight`` (decoded), ``index_blob`` / ``lut_blob`` (`BlobRef`), ``index_bytes``
            (stored size) and ``consumers`` (types of the ops that read the weight).
        """
        ops = self.functions[function]
        readers: dict[str, list[str]] = {}
        for op in ops:
            for args in op.inputs.values():
                for a in args:
                    if isinstance(a, str):
                        readers.setdefault(a, []).append(op.type)
        out = []
        for op in ops:
            if op.type != "constexpr_lut_to_dense":
                continue
            iref, lref = op.inputs["indices"][0], op.inputs["lut"][0]
            idx, lut = self.blob(iref), self.blob(lref)
            axis = None
            if "vector_axis" in op.inputs:
                axis = int(np.asarray(op.inputs["vector_axis"][0]).reshape(()))
            out.append({"name": op.outputs[0], "bits": int(iref.dtype[4:]), "indices": idx, "lut": lut,
                        "weight": decode_lut(idx, lut, axis), "index_blob": iref, "lut_blob": lref,
                        "index_bytes": self.blob_bytes(iref).size,
                        "consumers": readers.get(op.outputs[0], [])})
        return out


def decode_lut(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None = None) -> np.ndarray:
    """Dense tensor of a ``constexpr_lut_to_dense`` op, written from its spec (2-D indices).

    Args:
        indices: (R, C) integer indices. lut: (G_r, G_c, K, d) LUTs, one per block of
            ``R / G_r`` rows and ``C / G_c`` columns. vector_axis: axis the ``d`` entries
            of a vector LUT fill (required when d > 1).
    Returns:
        (R, C) for d = 1, else the vector axis grows ``d`` times.
    """
    R, C = indices.shape
    gr, gc, K, d = lut.shape
    rows = np.arange(R)[:, None] // (R // gr)
    cols = np.arange(C)[None, :] // (C // gc)
    vals = lut[rows, cols, indices.astype(np.int64)]  # (R, C, d)
    if d == 1:
        return vals[..., 0]
    if vector_axis == 1:
        return vals.reshape(R, C * d)
    if vector_axis == 0:
        return vals.transpose(0, 2, 1).reshape(R * d, C)
    raise ValueError(f"vector LUT (d={d}) needs vector_axis 0 or 1, got {vector_axis!r}")


def _binding(b: Any, names: Any) -> str | BlobRef | Any:
    if b.HasField("name") or not b.HasField("value"):
        return b.name
    return _value(b.value, names)


def _value(v: Any, names: Any) -> BlobRef | Any:
    t = v.type.tensorType
    shape = tuple(d.constant.size for d in t.dimensions)
    if v.HasField("blobFileValue"):
        return BlobRef(names(t.dataType), shape, v.blobFileValue.offset)
    imm = v.immediateValue.tensor
    kind = imm.WhichOneof("value")
    if not kind:
        return None
    vals = getattr(imm, kind).values
    arr = np.frombuffer(vals, np.uint8) if isinstance(vals, bytes) else np.asarray(list(vals))
    return arr.reshape(shape) if arr.size == int(np.prod(shape)) else arr  # packed immediates stay flat
