"""Core ML export: an ``.mlpackage`` whose clustered weights are edkm's own LUTs and indices.

`export_coreml` traces `edkm.deploy.graph.StaticLlama` (a LLaMA forward with an in-place
KV cache) once per function, converts it with coremltools to an ML program for iOS 18 /
macOS 15, and then replaces every clustered layer's dense fp16 weight constant by an
iOS 18 ``constexpr_lut_to_dense`` op built from the layer's LUT (G, K, d) and indices
(out, in / d) directly: one LUT per block of ``out / G`` output channels (per 16 rows when
trained so), indices of ``bits`` bits (3-bit stays 3-bit; coremltools' own
``palettize_weights`` would re-cluster, and its ``"unique"`` mode rounds 3 bits up to 4),
vector LUTs (``cluster_dim > 1``) along the input axis. The dense constant is found by its
exact fp16 content, so the LUT op replaces exactly the weight the traced graph used.

The package holds two functions sharing one set of weights and a KV-cache state
``(layers, 1, kv_heads, context, head_dim)`` fp16 per keys / values: ``prefill``
(``input_ids`` (1, prefill_len) int32 at ``position`` (1,) int32) and ``decode``
(``input_ids`` (1, 1)); both return ``logits`` (1, T, vocab) fp16. Each call writes its
tokens' keys / values at ``position ..`` and attends causally over the cache, so a prompt
shorter than ``prefill_len`` can be padded (padded slots are overwritten later) or fed
token by token through ``decode``. Not verified here (no Core ML runtime on Linux):
whether one ``MLState`` may pass from ``prefill`` to ``decode`` (the state types match);
running a whole sequence through ``decode`` needs no such sharing. Limits: batch 1; fp16
LUTs (an fp32 / bf16 LUT rounds once to fp16, as `edkm.export_compressed` does by default;
a warning gives the largest change);
Core ML takes 1, 2, 3, 4, 6 or 8-bit indices, so 5 / 7-bit LUTs are padded to 6 / 8 bits
(warned); the package cannot be executed on Linux (no Core ML runtime), see
`edkm.deploy.mlpackage` for the read-back checks.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edkm.deploy.graph import StaticLlama
from edkm.layers import LUTEmbedding, LUTLinear

log = logging.getLogger(__name__)

CORE_ML_BITS = (1, 2, 3, 4, 6, 8)  # index widths constexpr_lut_to_dense takes (iOS 18)
INSTALL_HINT = "pip install 'edkm[coreml]' (coremltools>=8.0)"


@dataclass(frozen=True)
class LUTTarget:
    """One clustered weight as Core ML will store it."""

    name: str  # module name (the first one when weights are tied)
    lut: np.ndarray  # (G, 1, 2**bits, d) fp16
    indices: np.ndarray  # (out, in / d) uint8 values < 2**bits
    bits: int
    dense: np.ndarray  # (out, in) fp16, lut decoded: what the traced graph holds


def require_coremltools() -> Any:
    """Import coremltools, or raise ``ImportError`` saying how to install it.

    Returns:
        The ``coremltools`` module.
    """
    try:
        import coremltools
    except ImportError as err:
        raise ImportError(f"Core ML export needs coremltools, which is not installed: {INSTALL_HINT}") from err
    return coremltools


def lut_targets(model: nn.Module) -> list[LUTTarget]:
    """The clustered weights of a finalized model, as Core ML LUTs.

    Args:
        model: A ``LlamaForCausalLM`` after `edkm.finalize` or from `edkm.load_compressed`.
    Returns:
        One `LUTTarget` per distinct LUT (tied layers appear once).
    Raises:
        ValueError: the model is still DKM-prepared or has no LUT layers (never finalized).
    """
    if any(hasattr(m, "parametrizations") for m in model.modules()):
        raise ValueError("the model is still DKM-prepared (weights are parametrized): call edkm.finalize(model) "
                         "before exporting to Core ML")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LUTLinear, LUTEmbedding))]
    if not layers:
        raise ValueError("the model has no LUT layers, so it was never finalized: prepare it with edkm.prepare, "
                         "train, call edkm.finalize(model) (or load an export with edkm.load_compressed), then export")
    out, seen, rounded = [], set(), []
    for name, m in layers:
        if id(m.indices) in seen:
            continue
        seen.add(id(m.indices))
        G, K, d = m.lut.shape
        bits = next(b for b in CORE_ML_BITS if 1 << b >= K)
        if bits != max(1, math.ceil(math.log2(K))):
            log.warning("%s: %d centroids stored with %d-bit indices (Core ML takes %s bits)", name, K, bits,
                        CORE_ML_BITS)
        lut16 = m.lut.detach().to(torch.float16)
        if m.lut.dtype != torch.float16:
            rounded.append((lut16.float() - m.lut.float()).abs().max().item())
        padded = torch.zeros(G, 1 << bits, d, dtype=torch.float16)
        padded[:, :K] = lut16
        idx = m.indices.detach().to(torch.int64)
        dense = torch.gather(lut16, 1, idx.reshape(G, -1, 1).expand(-1, -1, d)).reshape(m.weight_shape)
        out.append(LUTTarget(name, padded.unsqueeze(1).numpy(), idx.to(torch.uint8).numpy(), bits, dense.numpy()))
    if rounded and max(rounded) > 0:
        log.warning("%d LUTs are not fp16: rounded to fp16 for Core ML (largest change %.3g); export from an fp16 "
                    "model or edkm.load_compressed output for bit-exact LUTs", len(rounded), max(rounded))
    return out


def lut_op_name(layer: str) -> str:
    """Name of the ``constexpr_lut_to_dense`` op that holds module ``layer``'s weight."""
    return f"{layer}.lut_weight".replace(".", "_")


def export_coreml(model: nn.Module, path: str | Path, prefill_len: int = 64, context: int = 512,
                  functions: tuple[str, ...] = ("prefill", "decode")) -> dict[str, Any]:
    """Convert a finalized LLaMA to a stateful Core ML ``.mlpackage`` with edkm's exact LUTs.

    Args:
        model: ``LlamaForCausalLM`` after `edkm.finalize` or from `edkm.load_compressed`.
        path: Output ``.mlpackage`` directory (replaced if it exists).
        prefill_len: Tokens per ``prefill`` call (fixed shape).
        context: KV-cache length (longest prompt + generation).
        functions: Which of ``"prefill"`` / ``"decode"`` to include (the first is the default).
    Returns:
        ``{"path", "weight_bytes" (weight.bin size), "lut_layers", "bits" {layer: bits},
        "functions"}``.
    Raises:
        ImportError: coremltools is missing. ValueError: the model was never finalized, a
        layer type Core ML export cannot take, or bad sizes (the message names the value).
    """
    ct = require_coremltools()
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"Core ML output must end in .mlpackage, got {str(path)!r}")
    if not functions or set(functions) - {"prefill", "decode"} or len(set(functions)) != len(functions):
        raise ValueError(f"functions must be distinct names from ('prefill', 'decode'), got {functions!r}")
    if not 1 <= prefill_len <= context:
        raise ValueError(f"need 1 <= prefill_len <= context, got prefill_len={prefill_len}, context={context}")
    targets = lut_targets(model)
    graph = StaticLlama(model, context).eval()  # raises for layer types Core ML export cannot take
    lengths = {"prefill": prefill_len, "decode": 1}
    with tempfile.TemporaryDirectory(prefix="edkm-coreml-") as tmp:
        parts = {}
        for fn in functions:
            mlmodel = _convert(ct, graph, lengths[fn], targets)
            parts[fn] = Path(tmp) / f"{fn}.mlpackage"
            mlmodel.save(str(parts[fn]))
        if path.exists():
            shutil.rmtree(path)
        desc = ct.utils.MultiFunctionDescriptor()
        for fn, part in parts.items():
            desc.add_function(str(part), src_function_name="main", target_function_name=fn)
        desc.default_function_name = functions[0]
        ct.utils.save_multifunction(desc, str(path))
    weights = next(path.rglob("weight.bin"))
    info = {"path": str(path), "weight_bytes": weights.stat().st_size, "lut_layers": len(targets),
            "bits": {t.name: t.bits for t in targets}, "functions": list(functions)}
    log.info("wrote %s: %d LUT weights, weight.bin %d bytes", path, len(targets), info["weight_bytes"])
    return info


def coreml_summary(info: dict[str, Any]) -> str:
    """One line describing `export_coreml`'s result (for the CLI)."""
    bits = sorted(set(info["bits"].values()))
    return (f"wrote {info['path']}: weight.bin {info['weight_bytes'] / 2**20:.2f} MiB, {info['lut_layers']} LUT "
            f"weights at {'/'.join(map(str, bits))} bits, functions {', '.join(info['functions'])}")


def _convert(ct: Any, graph: StaticLlama, T: int, targets: list[LUTTarget]) -> Any:
    """Trace ``graph`` for T new tokens, convert, put the LUTs in; returns an MLModel."""
    graph.query_len = T
    ids = torch.zeros(1, T, dtype=torch.int32)
    pos = torch.zeros(1, dtype=torch.int32)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(graph, (ids, pos), check_trace=False)
    finally:
        graph.query_len = None
        graph.k_cache.zero_()
        graph.v_cache.zero_()
    cache = tuple(graph.k_cache.shape)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name=n)
              for n in ("k_cache", "v_cache")]
    inputs = [ct.TensorType(name="input_ids", shape=(1, T), dtype=np.int32),
              ct.TensorType(name="position", shape=(1,), dtype=np.int32)]
    common = dict(minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16)
    prog = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name="logits", dtype=np.float16)],
                      states=states, convert_to="milinternal", **common)
    place_luts(prog, targets)
    # The main pass pipeline already ran on `prog`; only the backend passes run again.
    return ct.convert(prog, convert_to="mlprogram", skip_model_load=True, pass_pipeline=ct.PassPipeline.EMPTY,
                      **common)


def place_luts(prog: Any, targets: list[LUTTarget]) -> int:
    """Replace each target's dense fp16 ``const`` in a MIL program by ``constexpr_lut_to_dense``.

    Args:
        prog: A coremltools MIL ``Program`` (``ct.convert(..., convert_to="milinternal")``).
        targets: From `lut_targets`.
    Returns:
        Number of const ops replaced. Raises ``ValueError`` if a target's weight is not
        found bit for bit (coremltools changed it, so the LUT could not be placed exactly).
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.scope import ScopeInfo

    by_key = {_key(t.dense): t for t in targets}
    found: dict[str, int] = {}
    for func in prog.functions.values():
        for op in list(func.operations):
            if op.op_type != "const" or op.outputs[0].dtype != types.fp16 or op.outputs[0].rank != 2:
                continue
            t = by_key.get(_key(op.outputs[0].val))
            if t is None:
                continue
            idx_type = types.nptype_from_builtin(getattr(types, f"uint{t.bits}"))
            # The validator wants the torch scopes of the op we replace (graph-pass scopes stay behind).
            scopes = [ScopeInfo(source=k, data=v) for k, v in op.scopes.items() if k.name.startswith("TORCHSCRIPT")]
            with func, mb.scope(*scopes):
                kwargs = {} if t.lut.shape[-1] == 1 else {"vector_axis": np.int32(1)}
                new = mb.constexpr_lut_to_dense(indices=t.indices.astype(idx_type), lut=t.lut, before_op=op,
                                                name=lut_op_name(t.name), **kwargs)
            op.enclosing_block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
            op.enclosing_block.remove_ops([op])
            found[t.name] = found.get(t.name, 0) + 1
    missing = [t.name for t in targets if t.name not in found]
    if missing:
        raise ValueError(f"coremltools did not keep the dense weight of {missing[:5]} bit for bit, so its LUT could "
                         "not be placed; please report this with your coremltools version")
    return sum(found.values())


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a)
    return a.shape, a.dtype.str, hash(a.tobytes())
