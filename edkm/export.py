"""Compressed export: densely packed LUT indices + LUTs in one safetensors file.

File layout (``*.edkm.safetensors``):

    <layer>.lut      (G, K, d) LUT in ``lut_dtype`` (fp16 by default)
    <layer>.codes    uint8, the layer's indices packed at ``bits`` bits each (3-bit codes
                     take 3 bits: 8 codes in 3 bytes), little-endian bit order
    <name>           every other parameter / buffer (norms, unclustered layers) in
                     ``dense_dtype``
    metadata["edkm"] JSON: format version, the model's LlamaConfig, and per clustered
                     layer its kind, shape, bits, groups, cluster_dim and tied source

`load_compressed` rebuilds a ``LlamaForCausalLM`` whose clustered layers are `LUTLinear`
/ `LUTEmbedding`: its logits equal the finalized model's when the LUT dtype equals the
one used at finalize (fp16 LUTs of an fp32 model round the centroids once; pass
``lut_dtype=None`` to keep the model's dtype).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from edkm.functional.packing import pack_codes, unpack_codes
from edkm.layers import LUTEmbedding, LUTLinear

FORMAT = 1
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
            tensors[f"{name}.codes"] = pack_codes(m.indices.reshape(1, -1), bits)[0, : math.ceil(m.indices.numel() * bits / 8)]
            tensors[f"{name}.lut"] = m.lut.to(lut_dtype or m.lut.dtype).contiguous()
            sizes["codes"] += tensors[f"{name}.codes"].numel()
            sizes["luts"] += tensors[f"{name}.lut"].numel() * tensors[f"{name}.lut"].element_size()
        if getattr(m, "bias", None) is not None:
            tensors[f"{name}.bias"] = _dense(m.bias.detach(), dense_dtype)
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
        tensors[key] = _dense(t, dense_dtype)
        sizes["fp16"] += 2 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
    from edkm.lowrank.persist import lowrank_units

    meta = {"format": FORMAT, "model_config": model.config.to_dict(), "layers": layers, "aliases": aliases,
            "lowrank_units": lowrank_units(model)}
    save_file(tensors, str(path), metadata={"edkm": json.dumps(meta)})
    sizes["file"] = Path(path).stat().st_size
    return sizes


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
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("edkm")
    if raw is None:
        raise ValueError(f"{path} is not an edkm export (no 'edkm' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported edkm export format {meta.get('format')!r} (want {FORMAT})")
    tensors = load_file(str(path))
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
