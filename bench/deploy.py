"""Deployment benchmark: Core ML package size, and generation speed / memory from an export.

On SmolLM2-135M (`edkm.hub.models.load_smollm2`, offline), every decoder linear clustered
with one LUT per 16 output channels (as the main job trains), finalized without
fine-tuning (sizes do not depend on centroid values; ``init_iters`` is lowered to keep the
k-means init short). ``--model tiny`` runs the same on the random tiny LLaMA (smoke test).

Sections:

- ``sizes``: per bit width, bytes of the Core ML ``weight.bin`` (`edkm.export_coreml`,
  prefill + decode functions sharing weights), the ``.edkm.safetensors`` export and all
  weights as fp16; ``identical_to_safetensors`` counts LUT ops (per function) whose stored
  index bytes and LUT equal the safetensors export's byte for byte.
- ``generate``: greedy generation of ``--new-tokens`` tokens: the float model vs
  `edkm.load_compressed` of the 4-bit export with `LUTLinear`'s decode cache on and off,
  timed interleaved (`bench.harness`); tokens/s = new tokens / median run time (prefill
  included). Memory:
  bytes of parameters + buffers, bytes held by the decode cache after a run, and the
  process's peak RSS growth during one run (`bench.harness.peak_memory`).

    python -m bench.deploy [--model smollm2|tiny] [--sections sizes,generate] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

import edkm
from bench.harness import Case, env_info, format_table, peak_memory, run_interleaved, write_rows
from edkm.deploy.generate import generate_ids
from edkm.layers import LUTEmbedding, LUTLinear


def _load(name: str):
    from edkm.hub.models import load_smollm2, tiny_llama
    from edkm.hub.tokenizer import ByteTokenizer

    if name == "tiny":
        return tiny_llama(), ByteTokenizer()
    return tuple(load_smollm2())


def _finalized(name: str, bits: int):
    model, tok = _load(name)
    cfg = edkm.DKMConfig(bits=bits, granularity="per_grouped_channel", group_size=16, cluster_dtype="bfloat16",
                         init_iters=3)
    edkm.prepare(model, cfg)
    return edkm.finalize(model.eval()), tok


def sizes(name: str, root: Path, context: int) -> list[dict]:
    """Bytes of Core ML weights, edkm safetensors and fp16, per bit width."""
    rows = []
    for bits in (3, 4):
        model, _ = _finalized(name, bits)
        st = edkm.export_compressed(model, root / f"{bits}bit.edkm.safetensors")
        info = edkm.export_coreml(model, root / f"{bits}bit.mlpackage", prefill_len=64, context=context)
        rows.append({"section": "sizes", "bits": bits, "coreml_weight_bytes": info["weight_bytes"],
                     "edkm_safetensors_bytes": st["file"], "fp16_bytes": st["fp16"],
                     "fp16_over_coreml": st["fp16"] / info["weight_bytes"], "lut_layers": info["lut_layers"],
                     "identical_to_safetensors": _identical(root / f"{bits}bit.mlpackage",
                                                            root / f"{bits}bit.edkm.safetensors")})
    return rows


def _identical(package: Path, safetensors: Path) -> str:
    """``"n/N"``: LUT ops (over all functions) whose index bytes and LUT equal the safetensors export's."""
    import json

    import numpy as np
    from safetensors import safe_open

    from edkm.deploy.coreml import lut_op_name
    from edkm.deploy.mlpackage import MLPackage

    pkg, same, total = MLPackage(package), 0, 0
    with safe_open(str(safetensors), "pt") as f:
        layers = json.loads(f.metadata()["edkm"])["layers"]
        for ops in pkg.functions.values():
            by_name = {op.outputs[0]: op for op in ops if op.type == "constexpr_lut_to_dense"}
            for name, meta in layers.items():
                if "tied_to" in meta:
                    continue
                total += 1
                op = by_name.get(lut_op_name(name))
                if op is None:
                    continue
                codes = pkg.blob_bytes(op.inputs["indices"][0])
                lut = pkg.blob(op.inputs["lut"][0])[:, 0, : meta["clusters"]]  # (G, K, d)
                ref_lut = f.get_tensor(f"{name}.lut").numpy()
                same += int(np.array_equal(codes, f.get_tensor(f"{name}.codes").numpy())
                            and np.array_equal(lut.view(np.uint16), ref_lut.view(np.uint16)))
    return f"{same}/{total}"


def _model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _cache_bytes(model: torch.nn.Module) -> int:
    return sum(m._decoded[5].numel() * m._decoded[5].element_size() for m in model.modules()
               if isinstance(m, (LUTLinear, LUTEmbedding)) and m._decoded is not None)


def generation(name: str, root: Path, new_tokens: int, repeats: int) -> list[dict]:
    """Tokens/s and memory: float model vs compressed with / without the decode cache."""
    path = root / "4bit.edkm.safetensors"
    if not path.exists():
        edkm.export_compressed(_finalized(name, 4)[0], path)
    float_model, tok = _load(name)
    cached = edkm.load_compressed(path)
    uncached = edkm.load_compressed(path)
    for m in uncached.modules():
        if isinstance(m, (LUTLinear, LUTEmbedding)):
            m.cache_decoded = False
    prompt = list(tok.encode("In the beginning God created the heaven and the earth."))
    models = {"float": float_model.eval(), "lut+cache": cached, "lut, no cache": uncached}
    timings = {k: {} for k in models}

    def run(k):
        return lambda: list(generate_ids(models[k], prompt, new_tokens, timings=timings[k]))

    cases = [Case(k, run(k)) for k in models]
    run_interleaved(cases, torch.device("cpu"), warmup=1, repeats=repeats)
    rows = []
    for c in cases:
        mem = peak_memory(c.fn, torch.device("cpu"))
        s = c.stats()
        rows.append({"section": "generate", "model": c.name, "new_tokens": new_tokens,
                     "tokens_per_s": new_tokens / s["median_s"], "run_median_s": s["median_s"],
                     "last_run_decode_tokens_per_s": (new_tokens - 1) / timings[c.name]["decode_s"],
                     "weights_bytes": _model_bytes(models[c.name]),
                     "decode_cache_bytes": _cache_bytes(models[c.name]), "peak_rss_growth_bytes": mem["peak_bytes"]})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["tokens_per_s_vs_float"] = r["tokens_per_s"] / base
    return rows


def main() -> None:
    """Run the chosen sections, print tables, append JSON rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2", help="Model to measure.")
    p.add_argument("--sections", default="sizes,generate", help="Comma-separated: sizes, generate.")
    p.add_argument("--new-tokens", type=int, default=32, help="Generated tokens per run.")
    p.add_argument("--repeats", type=int, default=3, help="Timed rounds per case.")
    p.add_argument("--context", type=int, default=512, help="Core ML KV-cache length.")
    p.add_argument("--workdir", help="Keep exports here (default: a temporary directory).")
    p.add_argument("--out", default="bench/results/deploy.jsonl", help="JSON lines output.")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = []
        if "sizes" in sections:
            rows += sizes(args.model, root, args.context)
            print(format_table([r for r in rows if r["section"] == "sizes"],
                               ["bits", "coreml_weight_bytes", "edkm_safetensors_bytes", "fp16_bytes",
                                "fp16_over_coreml", "identical_to_safetensors"]))
        if "generate" in sections:
            g = generation(args.model, root, args.new_tokens, args.repeats)
            rows += g
            print(format_table(g, ["model", "tokens_per_s", "tokens_per_s_vs_float", "weights_bytes",
                                   "decode_cache_bytes", "peak_rss_growth_bytes"]))
    env = env_info(torch.device("cpu"))
    write_rows(args.out, [{**r, "model_name": args.model, **env} for r in rows])


if __name__ == "__main__":
    main()
