"""Compressed export: densely packed LUT indices + LUTs in one safetensors file.

File layout (``*.edkm.safetensors``):

    <layer>.lut      (G, K, d) LUT in ``lut_dtype`` (fp16 by default)
    <layer>.codes    uint8, the layer's indices packed at ``bits`` bits each (3-bit codes
                     take 3 bits: 8 codes in 3 bytes), little-endian bit order
    <name>           every other parameter / buffer (norms, unclustered layers) in
                     ``dense_dtype``
    metadata["edkm"] JSON: format version, the model's LlamaConfig, per clustered layer
                     its kind, shape, bits, groups, cluster_dim and tied source, and
                     ``sha256``: the digest of the tensor payload (`payload_sha256`)

Exports cannot lie: `export_compressed` refuses non-finite values and values outside the
float16 range when casting to float16 (the error names the tensor and its max |value|),
writes to a temporary name and renames it into place (a failed write, e.g. a full disk,
leaves no partial file and says how many bytes were needed), and `load_compressed`
verifies the digest and names the path on any truncated, corrupt or foreign file.
Files written before the digest existed load with a warning.

`load_compressed` rebuilds a ``LlamaForCausalLM`` whose clustered layers are `LUTLinear`
/ `LUTEmbedding`: its logits equal the finalized model's when the LUT dtype equals the
one used at finalize (fp16 LUTs of an fp32 model round the centroids once; pass
``lut_dtype=None`` to keep the model's dtype).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from edkm.functional.packing import pack_codes, unpack_codes
from edkm.layers import LUTEmbedding, LUTLinear

log = logging.getLogger(__name__)

FORMAT = 1
FP16_MAX = 65504.0
FOLDER_WEIGHTS = "model.edkm.safetensors"  # the weights file inside a save_pretrained-style folder


def export_compressed(model: nn.Module, path: str | Path, lut_dtype: torch.dtype | None = torch.float16,
                      dense_dtype: torch.dtype | None = torch.float16) -> dict[str, int]:
    """Write a finalized model (LUT layers) to a packed safetensors file.

    Args:
        model: A ``LlamaForCausalLM`` after `edkm.finalize`.
        path: Output file.
        lut_dtype: dtype of LUTs (None = keep). dense_dtype: dtype of other float tensors.
    Returns:
        Sizes in bytes: ``file``, ``fp16`` (all weights as fp16), ``codes``, ``luts``.
    """
    lut_layers = {n: m for n, m in model.named_modules() if isinstance(m, (LUTLinear, LUTEmbedding))}
    if not lut_layers:
        raise ValueError("model has no LUT layers: call edkm.finalize(model) before exporting")
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    seen: dict[int, str] = {}
    sizes = {"codes": 0, "luts": 0, "fp16": 0}
    for name, m in lut_layers.items():
        G, K, d = m.lut.shape
        bits = max(1, math.ceil(math.log2(K)))
        info = {"kind": "embedding" if isinstance(m, LUTEmbedding) else "linear", "shape": list(m.weight_shape),
                "bits": bits, "groups": G, "clusters": K, "cluster_dim": d}
        if isinstance(m, LUTEmbedding):
            info["padding_idx"] = m.padding_idx
        if id(m.indices) in seen:
            info["tied_to"] = seen[id(m.indices)]
        else:
            sizes["fp16"] += 2 * m.weight_shape[0] * m.weight_shape[1]
            seen[id(m.indices)] = name
            # one row: the layout of `pack_codes`, minus the padding bytes (all zero bits)
            n_bytes = math.ceil(m.indices.numel() * bits / 8)
            tensors[f"{name}.codes"] = pack_codes(m.indices.reshape(1, -1), bits)[0, :n_bytes]
            tensors[f"{name}.lut"] = _checked(f"{name}.lut", m.lut, lut_dtype)
            sizes["codes"] += tensors[f"{name}.codes"].numel()
            sizes["luts"] += tensors[f"{name}.lut"].numel() * tensors[f"{name}.lut"].element_size()
        if getattr(m, "bias", None) is not None:
            tensors[f"{name}.bias"] = _checked(f"{name}.bias", m.bias.detach(), dense_dtype)
        layers[name] = info
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, int], str] = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in lut_layers or key in tensors or _aliases_lut(model, key, lut_layers):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ident in by_storage:  # tied weights (lm_head = embed_tokens): store once
            aliases[key] = by_storage[ident]
            continue
        if t.numel():
            by_storage[ident] = key
        tensors[key] = _checked(key, t, dense_dtype)
        sizes["fp16"] += 2 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
    from edkm.lowrank.persist import lowrank_units

    meta = {"format": FORMAT, "model_config": model.config.to_dict(), "layers": layers, "aliases": aliases,
            "lowrank_units": lowrank_units(model), "sha256": payload_sha256(tensors)}
    _write(tensors, {"edkm": json.dumps(meta)}, Path(path))
    sizes["file"] = Path(path).stat().st_size
    return sizes


def payload_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the tensors in key order: each key, dtype, shape and raw bytes.

    Args:
        tensors: ``{name: tensor}`` as written to (or read from) the file.
    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _write(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """``save_file`` under a temporary name, then rename: no partial file on failure."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {str(path.parent)!r} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = -1
        short = "; no space left on the device" if 0 <= free < need else ""
        raise OSError(f"could not write export {path}: {err} (needs about {need} bytes, {free} bytes free{short})") \
            from err


def _checked(key: str, t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` cast to ``dtype`` (None = keep) after checking it is finite and, for float16,
    inside its range; the error names the tensor and its max |value|."""
    if not t.is_floating_point():
        return t.contiguous()
    peak = float(torch.linalg.vector_norm(t.detach(), float("inf"))) if t.numel() else 0.0
    if not math.isfinite(peak):
        raise ValueError(f"cannot export {key}: it holds non-finite values (max |value| {peak}); "
                         "the model diverged, export an earlier checkpoint")
    target = dtype or t.dtype
    if target == torch.float16 and peak > FP16_MAX:
        raise ValueError(f"cannot export {key} as float16: max |value| {peak:.4g} exceeds the float16 range "
                         f"({FP16_MAX:g}); export it as float32 or bfloat16 (lut_dtype / dense_dtype) or retrain")
    return _dense(t, dtype)


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a ``LlamaForCausalLM`` from `export_compressed` output.

    Args:
        path: The ``.edkm.safetensors`` file, or a folder holding one as ``FOLDER_WEIGHTS``
            (`edkm.deploy.folder.save_folder`).
        dtype: Compute dtype of dense parameters and LUTs.
    Returns:
        The model in eval mode, clustered layers as `LUTLinear` / `LUTEmbedding`.
    """
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if path.is_dir():  # a save_pretrained-style folder (edkm.deploy.folder)
        path = path / FOLDER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"compressed model {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("edkm")
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{path} is not a readable safetensors file (truncated, or not an edkm export): {err}") \
            from err
    if raw is None:
        raise ValueError(f"{path} is not an edkm export (no 'edkm' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: the 'edkm' metadata is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the 'edkm' metadata is not a JSON object; not an edkm export")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported edkm export format {meta.get('format')!r} (want {FORMAT})")
    if not isinstance(meta.get("layers"), dict) or "model_config" not in meta:
        raise ValueError(f"{path}: the 'edkm' metadata lacks 'layers' / 'model_config'; not an edkm export")
    want = meta.get("sha256")
    if want is None:
        log.warning("%s carries no payload digest (written before digests existed): cannot verify it", path)
    elif payload_sha256(tensors) != want:
        raise ValueError(f"{path} is corrupt: its tensor payload does not match the sha256 in its metadata "
                         f"({want[:12]}...)")
    cfg = dict(meta["model_config"])
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).to(dtype)
    from edkm.lowrank.persist import apply_structure

    apply_structure(model, meta.get("lowrank_units", []))  # LoRD factors, before their LUTs go in
    built: dict[str, nn.Module] = {}
    for name, info in meta["layers"].items():
        src = info.get("tied_to", name)
        out_f, in_f = info["shape"]
        lut = tensors[f"{src}.lut"].to(dtype)
        idx = unpack_codes(tensors[f"{src}.codes"].unsqueeze(0), info["bits"], out_f * in_f // info["cluster_dim"])[0]
        idx = idx.reshape(out_f, in_f // info["cluster_dim"])
        if info["kind"] == "embedding":
            new: nn.Module = LUTEmbedding(lut, idx, (out_f, in_f), info.get("padding_idx"))
        else:
            bias = tensors.get(f"{name}.bias")
            new = LUTLinear(lut, idx, None if bias is None else bias.to(dtype), (out_f, in_f))
        if src in built:  # tied: share the very same buffers
            new.lut, new.indices = built[src].lut, built[src].indices
        built[name] = new
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()
            if not k.endswith((".codes", ".lut")) and k.rpartition(".")[0] not in meta["layers"]}
    for key, src in meta.get("aliases", {}).items():
        rest[key] = rest[src]
    missing, unexpected = model.load_state_dict(rest, strict=False)
    lut_keys = {k for k in model.state_dict() if k.rpartition(".")[0] in meta["layers"]}
    missing = [k for k in missing if k not in lut_keys and not k.endswith("rotary_emb.inv_freq")]
    for key, src in meta.get("aliases", {}).items():  # tie again, as in the exported model
        owner, _, attr = key.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_submodule(src.rpartition(".")[0]).get_parameter(
            src.rpartition(".")[2]))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    return model.eval()


def _dense(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()


def _aliases_lut(model: nn.Module, key: str, lut_layers: dict[str, nn.Module]) -> bool:
    """True for state-dict keys of tied weights that resolve to a LUT layer."""
    owner = key.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(owner), (LUTLinear, LUTEmbedding)) if owner else False
    except AttributeError:
        return False
