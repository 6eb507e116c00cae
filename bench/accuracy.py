"""Accuracy benchmark: train-time clustering against post-training, at 3 and 4 bits.

SmolLM2-135M; every decoder linear (q/k/v/o/gate/up/down of all 30 layers, 210 layers)
gets one LUT of 2**bits entries per ``--group-size`` output channels in every row; the
embedding (tied to the LM head) stays float. Every row is scored on the same windows of
each domain: the held-out split of the training corpus (KJV Acts-Revelation; no held-out
token is ever trained or calibrated on) and of each ``--domains`` text (default ``wiki``:
Wikipedia article summaries, from a different package than any training or calibration
text). Per domain: perplexity, its ratio to the float model's (``<domain>_x_fp``), mean
KL(fp || row) per token (``<domain>_kl``, nats) and top-1 next-token agreement with the
float model (``<domain>_top1``); ``ppl`` / ``ppl_vs_fp`` repeat the first domain's.
``bits_per_weight`` counts every stored bit of the quantised layers (codes packed densely,
fp16 LUTs / scales / zeros; `bench.accuracy_quant.bits_per_weight`). Rows:

    fp            the float model
    fp_finetune   the float model fine-tuned on the same tokens as the DKM rows (how much
                  of a fine-tune's gain is adapting to the corpus, not recovering from
                  clustering)
    rtn           round to nearest on a uniform grid from each group's min to max
    kmeans        k-means per group (edkm's init: range seed + Lloyd), round to nearest
    ct_ptq        coremltools PostTrainingPalettizer (k-means per group)
    ct_skm        coremltools SKMPalettizer (sensitivity-weighted k-means, SqueezeLLM style)
    ct_dkm        coremltools DKMPalettizer fine-tuned: same steps, batches, LR, tau
    ours_init     edkm's sensitivity-weighted k-means init (diagonal Fisher), no training
    ours          edkm DKM from that init, importance-weighted, fine-tuned on the same
                  budget as ct_dkm
    hqq_g<G>      HQQ (pip hqq), calibration-free, zero + scale per G consecutive weights
    gptq_g<G>     GPTQ (pip llmcompressor), symmetric, scale per G columns, calibrated on
                  the same windows as ours' Fisher

``--layer-bits GLOB=BITS,...`` gives the edkm rows (kmeans, ours_init, ours) mixed widths
(`edkm.DKMConfig.layers`, first match wins; the row records them as ``layer_bits``); the
other rows stay at ``--bits``, so compare them at equal ``bits_per_weight``.

Every clustered row is checked to hold at most 2**bits distinct values per LUT group
(``lut_violations`` 0; each layer at its own width; for hqq / gptq, per quantisation group). hqq / gptq come from the
``peers`` extra (``pip install -e .[peers]``); a missing package is an error row, and so is
a GPTQ group that does not divide a layer's input width (SmolLM2: 576 = 4.5 x 128).
Fine-tunes share one loop (`finetune`): AdamW, cosine LR, grad clip 1, batches of ``--batch-size``
training windows in order. Calibration (Fisher for
ct_skm and ours, both from per-window squared gradients) uses the first
``--calib-windows`` training windows.

    python -m bench.accuracy --quick                  # smoke-sized: decoder layer 0 only
    python -m bench.accuracy --out accuracy.jsonl     # the README table (~45 min per half on a CPU core)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# the repo root first, and not bench/ itself (bench/kernels.py would hide HF's kernels)
sys.path[:] = [str(Path(__file__).resolve().parents[1]),
               *(p for p in sys.path if p != str(Path(__file__).resolve().parent))]

import edkm  # noqa: E402
from bench import accuracy_peers as peers  # noqa: E402  (imports coremltools only when a ct row runs)
from bench import accuracy_quant as quant  # noqa: E402  (imports hqq / llmcompressor only when their row runs)
from bench.harness import env_info, format_table, write_rows  # noqa: E402
from edkm.evaluate import fidelity, teacher_logits  # noqa: E402
from edkm.preparation import clustered_layers  # noqa: E402

ALL_METHODS = ("fp", "fp_finetune", "rtn", "kmeans", "ct_ptq", "ct_skm", "ours", "ct_dkm", "hqq", "gptq")
QUICK = dict(steps=4, eval_windows=8, calib_windows=4, layers=1)
FULL = dict(steps=48, eval_windows=32, calib_windows=32, layers=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"CPU-sized budget {QUICK} (defaults: {FULL})")
    p.add_argument("--bits", default="4,3", help="comma-separated index widths (default 4,3)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated rows of {ALL_METHODS}")
    p.add_argument("--group-size", type=int, default=16, help="output channels per LUT (default 16)")
    p.add_argument("--peer-groups", default="64,128", help="weights per group of the hqq / gptq rows (default 64,128)")
    p.add_argument("--domains", default="wiki",
                   help="comma-separated corpora scored besides the training corpus's held-out split (default wiki; "
                        "'' for none)")
    p.add_argument("--steps", type=int, help="fine-tune steps of fp_finetune / ct_dkm / ours")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak AdamW LR of every fine-tune (default 2e-4)")
    p.add_argument("--tau", type=float, default=1e-4, help="DKM temperature, ours and ct_dkm (default 1e-4)")
    p.add_argument("--tau-mode", default="global", choices=("global", "gap"),
                   help="ours: one tau for every layer, or each layer's from its centroid spacing (DKMConfig.tau_mode)")
    p.add_argument("--iters", type=int, default=3, help="DKM iterations per forward (default 3)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--eval-windows", type=int, help="held-out windows scored")
    p.add_argument("--calib-windows", type=int, help="training windows for the Fisher (ct_skm, ours)")
    p.add_argument("--layers", type=int, help="cluster only decoder layers 0..N-1 in every row (default: all)")
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"),
                   help="tiny: a random 2-layer LLaMA on random tokens (a smoke test of the bench)")
    p.add_argument("--layer-bits", default="",
                   help="mixed precision of the edkm rows (kmeans, ours_init, ours): comma-separated GLOB=BITS, "
                        "first match wins (DKMConfig.layers), e.g. '*.k_proj=5,*.v_proj=5'; other rows stay at --bits")
    p.add_argument("--no-importance", action="store_true", help="ours without the Fisher weighting (ablation)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="append the rows as JSON lines to this file (after every row)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)
    args.bits = [int(b) for b in args.bits.split(",")]
    args.methods = args.methods.split(",")
    args.peer_groups = [int(g) for g in args.peer_groups.split(",") if g]
    args.domains = [d for d in args.domains.split(",") if d]
    args.layer_bits = _layer_bits(p, args.layer_bits)
    if any(g < 8 or g % 8 for g in args.peer_groups):
        p.error(f"--peer-groups must be multiples of 8, got {args.peer_groups}")
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {ALL_METHODS}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    if any(not 1 <= b <= 8 for b in args.bits):
        p.error(f"--bits must be in 1..8, got {args.bits}")
    for name in ("steps", "batch_size", "eval_windows", "calib_windows", "group_size", "seq_len", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _layer_bits(p: argparse.ArgumentParser, spec: str) -> dict[str, int]:
    """``--layer-bits`` 'GLOB=BITS,...' as an ordered {glob: bits}; a bad entry is a usage error naming it."""
    out: dict[str, int] = {}
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        glob, sep, bits = item.rpartition("=")
        if not sep or not glob or not bits.strip().isdigit() or not 1 <= int(bits) <= 8:
            p.error(f"--layer-bits entries are GLOB=BITS with BITS in 1..8, got {item!r}")
        out[glob.strip()] = int(bits)
    return out


# ----------------------------------------------------------------------------- methods


@torch.no_grad()
def rtn_(model: nn.Module, names: list[str], bits: int, group_size: int) -> None:
    """Round every group of ``group_size`` rows to 2**bits levels evenly spaced min..max."""
    for name in names:
        w = model.get_submodule(name).weight
        g = w.view(w.shape[0] // group_size, -1)
        lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
        step = ((hi - lo) / (2**bits - 1)).clamp_min(torch.finfo(w.dtype).tiny)
        g.copy_(torch.round((g - lo) / step) * step + lo)


def dkm_config(args: argparse.Namespace, bits: int, names: list[str]) -> edkm.DKMConfig:
    """edkm's settings for a row: grouped LUTs on exactly ``names``, fp32 master weights clustered as
    bf16, ``--layer-bits`` as per-layer widths."""
    return edkm.DKMConfig(bits=bits, granularity="per_grouped_channel", group_size=args.group_size,
                          cluster_dtype="bfloat16", tau=args.tau, tau_mode=args.tau_mode, max_iters=args.iters,
                          include=tuple(names), min_weight_numel=0,
                          layers={glob: {"bits": b} for glob, b in args.layer_bits.items()})


def finetune(model: nn.Module, train: torch.Tensor, args: argparse.Namespace, label: str,
             after_step: Callable[[], object] | None = None) -> list[dict]:
    """The shared fine-tune loop of fp_finetune, ct_dkm and ours (every parameter trains);
    ``after_step`` runs after each optimizer step. Returns per-step logs."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    cosine = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    model.train()
    logs = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        start = (step * args.batch_size) % train.shape[0]
        ids = train[start : start + args.batch_size]
        loss = model(input_ids=ids, labels=ids).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: loss is {loss.item()} at step {step + 1}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if after_step is not None:
            after_step()
        logs.append({"step": step + 1, "loss": loss.item(), "step_s": time.perf_counter() - t0})
        print(f"  {label} step {step + 1}/{args.steps} loss {loss.item():.3f} ({logs[-1]['step_s']:.1f} s)",
              file=sys.stderr, flush=True)
    model.eval()
    return logs


class Bench:
    """Runs the rows on copies of one loaded model and keeps the results."""

    def __init__(self, model: nn.Module, train: torch.Tensor, domains: dict[str, torch.Tensor],
                 args: argparse.Namespace):
        """``domains``: name -> (n, L) eval windows, the training corpus's held-out split first."""
        self.fp, self.train, self.domains, self.args = model, train, domains, args
        heldout = next(iter(domains.values()))
        # the float model's logits per domain, computed once (halves every row's scoring time)
        self.fp_logits = {d: teacher_logits(model, w) for d, w in domains.items()}
        self.names = [n for n in peers.select_linears(model)
                      if args.layers is None or int(n.split(".")[2]) < args.layers]  # model.layers.<i>.*
        self.calib = train[: args.calib_windows]
        self.rows: list[dict] = []
        self.tags = {**env_info(torch.device("cpu")), "bench": "accuracy", "quick": args.quick,
                     "model": args.model, "layers_clustered": len(self.names), "group_size": args.group_size,
                     "steps": args.steps, "batch_size": args.batch_size,
                     "lr": args.lr, "tau": args.tau, "tau_mode": args.tau_mode, "seq_len": args.seq_len,
                     "train_tokens": args.steps * args.batch_size * args.seq_len,
                     "calib_tokens": self.calib.numel(), "eval_tokens": heldout.numel(),
                     "eval_predictions": heldout.shape[0] * (heldout.shape[1] - 1), "domains": list(domains)}

    def shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every clustered layer of the float model."""
        return [tuple(self.fp.get_submodule(n).weight.shape) for n in self.names]

    def row(self, method: str, bits: int | None, build: Callable[[nn.Module], dict | None],
            model: nn.Module | None = None, check: Callable[[nn.Module], int] | None = None) -> None:
        """Build one row on ``model`` (default: a fresh copy of the float model), score it on every
        domain against the float model; a failure becomes an error row. ``check``: counts
        quantisation groups holding more than 2**bits values (default: LUT groups of rows)."""
        t0 = time.perf_counter()
        print(f"[{method}{'' if bits is None else f' {bits}-bit'}] ...", file=sys.stderr, flush=True)
        row = {"method": method, "bits": bits, "bits_per_weight": None}
        try:
            model = copy.deepcopy(self.fp) if model is None else model
            row.update(build(model) or {})
            for i, (domain, windows) in enumerate(self.domains.items()):
                f = fidelity(model, None, windows, cached_teacher_logits=self.fp_logits[domain])
                row.update({f"{domain}_ppl": f.perplexity, f"{domain}_x_fp": f.ppl_ratio, f"{domain}_kl": f.kl,
                            f"{domain}_top1": f.top1_agreement})
                if i == 0:
                    row["ppl"], row["ppl_vs_fp"] = f.perplexity, f.ppl_ratio
            if bits is not None:
                row["lut_violations"] = (check(model) if check is not None else
                                         peers.count_lut_violations(model, self.names, bits, self.args.group_size))
        except Exception as e:  # a peer that breaks is a row, not the end of the run
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        row["seconds"] = time.perf_counter() - t0
        print(f"  -> {json.dumps({k: row.get(k) for k in ('ppl', 'ppl_vs_fp', 'bits_per_weight', 'error')})}",
              file=sys.stderr, flush=True)
        self.rows.append(row)
        if self.args.out:
            write_rows(self.args.out, [{**self.tags, **row}])

    def run(self) -> None:
        a = self.args
        if "fp" in a.methods:
            self.row("fp", None, lambda m: None)
        if "fp_finetune" in a.methods:
            self.row("fp_finetune", None, lambda m: {"train_log": finetune(m, self.train, a, "fp_finetune")})
        for bits in a.bits:
            for method in a.methods:
                if method not in ("fp", "fp_finetune"):
                    getattr(self, method)(bits)

    def lut_bpw(self, bits: int | dict[str, int]) -> dict:
        """bits_per_weight of one fp16 LUT per ``--group-size`` rows on every clustered layer
        (``bits``: one width, or each layer's by name)."""
        width = bits if isinstance(bits, dict) else dict.fromkeys(self.names, bits)
        return {"bits_per_weight": quant.bits_per_weight(
            quant.lut_storage(s, width[n], self.args.group_size) for n, s in zip(self.names, self.shapes()))}

    def edkm_widths(self, cfg: edkm.DKMConfig) -> tuple[dict[str, int], dict, Callable[[nn.Module], int]]:
        """Each layer's width under ``cfg``, the row's extra fields (``layer_bits`` when mixed) and
        its LUT check (at most 2**width values per group of each layer)."""
        width = {n: cfg.for_layer(n).bits for n in self.names}
        extra = {"layer_bits": dict(self.args.layer_bits)} if self.args.layer_bits else {}
        return width, extra, lambda m: peers.count_lut_violations(m, self.names, width, self.args.group_size)

    def rtn(self, bits: int) -> None:
        g = self.args.group_size
        self.row("rtn", bits, lambda m: rtn_(m, self.names, bits, g) or {
            "bits_per_weight": quant.bits_per_weight(quant.row_range_storage(s, bits, g) for s in self.shapes())})

    def kmeans(self, bits: int) -> None:
        cfg = dkm_config(self.args, bits, self.names)
        _, extra, check = self.edkm_widths(cfg)

        def build(m: nn.Module) -> dict:
            edkm.prepare(m, cfg)
            edkm.finalize(m)
            return {"bits_per_weight": quant.bits_per_weight(quant.model_lut_storage(m, self.names)), **extra}

        self.row("kmeans", bits, build, check=check)

    def ct_ptq(self, bits: int) -> None:
        self.row("ct_ptq", bits, lambda m: peers.ct_post_training(m, bits, self.args.group_size, self.names) and
                 self.lut_bpw(bits))

    def ct_skm(self, bits: int) -> None:
        # batch_size=1: per-window squared gradients, the same Fisher estimator as ours
        self.row("ct_skm", bits, lambda m: peers.ct_skm(m, bits, self.args.group_size, self.calib,
                                                        batch_size=1, names=self.names) and self.lut_bpw(bits))

    def hqq(self, bits: int) -> None:
        for g in self.args.peer_groups:
            self.row(f"hqq_g{g}", bits, lambda m, g=g: {
                "bits_per_weight": quant.bits_per_weight(quant.hqq_(m, self.names, bits, g)), "peer_group": g},
                check=lambda m, g=g: quant.count_group_violations(m, self.names, bits, g, flat=True))

    def gptq(self, bits: int) -> None:
        for g in self.args.peer_groups:
            self.row(f"gptq_g{g}", bits, lambda m, g=g: {
                "bits_per_weight": quant.bits_per_weight(quant.gptq_(m, self.names, bits, g, self.calib)),
                "peer_group": g}, check=lambda m, g=g: quant.count_group_violations(m, self.names, bits, g))

    def ct_dkm(self, bits: int) -> None:
        def build(m: nn.Module) -> dict:
            pal = peers.ct_dkm_prepare(m, bits, self.args.group_size, tau=self.args.tau, kmeans_iters=self.args.iters,
                                       names=self.names)
            logs = finetune(m, self.train, self.args, f"ct_dkm {bits}-bit", after_step=pal.step)
            peers.ct_dkm_finalize(m, pal)
            return {"train_log": logs, **self.lut_bpw(bits)}

        self.row("ct_dkm", bits, build)

    def ours(self, bits: int) -> None:
        """ours_init (the weighted k-means, no training), then ours (DKM fine-tune from it)."""
        cfg = dkm_config(self.args, bits, self.names)
        width, extra, check = self.edkm_widths(cfg)
        prepared: dict[str, nn.Module] = {}

        def init(m: nn.Module) -> dict:
            t0 = time.perf_counter()
            imp = None if self.args.no_importance else edkm.fisher_importance(m, self.calib, cfg)
            edkm.prepare(m, cfg, importance=imp)
            prepared["model"] = m
            return {"importance": imp is not None, "init_s": time.perf_counter() - t0, **self.lut_bpw(width), **extra}

        self.row("ours_init", bits, init, check=check)
        if "model" not in prepared:
            return

        def train(m: nn.Module) -> dict:  # continues from the init row's model
            logs = finetune(m, self.train, self.args, f"ours {bits}-bit")
            drift = sum(p.drift.item() for _, _, p in clustered_layers(m)) / len(self.names)
            edkm.finalize(m)
            return {"train_log": logs, "centroid_drift": drift, "importance": not self.args.no_importance,
                    "bits_per_weight": quant.bits_per_weight(quant.model_lut_storage(m, self.names)), **extra}

        self.row("ours", bits, train, model=prepared.pop("model"), check=check)


def load(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor], str]:
    """(float model, training windows, {domain: eval windows} with the training corpus first, description)."""
    n_train = max(args.steps * args.batch_size, args.calib_windows)
    if args.model == "tiny":
        from edkm.hub.models import tiny_llama

        gen = torch.Generator().manual_seed(0)
        train = torch.randint(0, 256, (n_train, args.seq_len), generator=gen)
        domains = {"heldout": torch.randint(0, 256, (args.eval_windows, args.seq_len), generator=gen)}
        for d in args.domains:  # random stand-ins for the named texts
            domains[d] = torch.randint(0, 256, (args.eval_windows, args.seq_len), generator=gen)
        return tiny_llama(hidden=64, layers=2, intermediate=128), train, domains, "tiny random LLaMA, random tokens"
    from edkm.hub.models import load_smollm2
    from edkm.hub.text import build_windows, load_corpus, pack_windows, split_corpus, tokenize_text

    model, tokenizer = load_smollm2()
    corpus = load_corpus("default")
    w = build_windows(split_corpus(corpus), tokenizer, args.seq_len, max_train_windows=n_train,
                      max_heldout_windows=args.eval_windows)
    domains = {corpus.name: w.heldout}
    for d in args.domains:  # held-out split of each text: the same windows whoever trains on its train side
        other = split_corpus(load_corpus(d)).heldout_text
        domains[d] = pack_windows(tokenize_text(tokenizer, other), args.seq_len)[: args.eval_windows]
    return model, w.train, domains, f"SmolLM2-135M, {corpus.name}; scored on {', '.join(domains)}"


# ----------------------------------------------------------------------------- report


COLUMNS = ["method", "bits", "bits_per_weight", "lut_violations", "seconds", "error"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, train, domains, what = load(args)
    print(f"{what}: train {tuple(train.shape)}, eval {[tuple(w.shape) for w in domains.values()]}; {args.steps} steps x "
          f"{args.batch_size} windows x {args.seq_len} tokens; threads {torch.get_num_threads()}",
          file=sys.stderr, flush=True)
    bench = Bench(model.eval(), train, domains, args)
    bench.run()
    per_domain = [f"{d}_{m}" for d in domains for m in ("ppl", "x_fp", "kl", "top1")]
    print(format_table(bench.rows, COLUMNS[:3] + per_domain + COLUMNS[3:]))
    t = bench.tags
    print(f"\nper domain: {t['eval_predictions']} predicted tokens; fine-tune: {t['train_tokens']} tokens "
          f"({args.steps} steps); calibration: {t['calib_tokens']} tokens; total {time.perf_counter() - t0:.0f} s")
    return 0 if all("error" not in r for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
