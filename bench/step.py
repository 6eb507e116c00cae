"""One whole-model training step, plain vs with DKM: seconds, ratio, and where DKM's share goes.

What is timed, for each of two copies of the same model in one process:

    loss = model(input_ids=batch, labels=batch).loss      # forward
    loss.backward()                                       # backward
    clip_grad_norm_ (when the preset's optim.grad_clip > 0, as the trainer does)
    AdamW.step(); zero_grad(set_to_none=True)             # optimizer

``plain`` is the float model as loaded; ``dkm`` is a copy taken before `edkm.prepare`
clusters its layers with the preset's DKM settings (and, as the trainer does with
``data.importance_windows``, a Fisher importance of that many training windows weighting
the centroid updates). Both see the same batch: the first ``batch_size`` training windows
of the trainer's corpus and tokenizer (`edkm.train.data`, KJV by default). Both are warmed
up, then timed in interleaved rounds, alternating which goes first (`bench.harness`), so
background load hits both alike. ``ratio`` = dkm_s / plain_s of the medians: the price of
clustering a training step. Then one more DKM step runs under torch.profiler and its DKM
share is split into phases (`bench.phases`: table build, iterations, soft weights,
backward replay, per-element gradient, casts and glue); ``est_s`` spreads the timed
difference dkm_s - plain_s over the phases by their profiled shares.

Settings come from the preset (``--config``, default configs/smollm2-135m-4bit.yaml) through
`edkm.train.config.load_config`, so they follow it; the flags override single fields.
CPU runs use one intra-op thread unless --threads says otherwise (see bench/speed.py for
why; the issue asks for 1 and 2 threads).

Usage:
    python -m bench.step                          # SmolLM2-135M, the main 4-bit preset (4-row LUTs), 4 x 128 tokens
    python -m bench.step --group-size 16          # the 16-row LUTs the earlier numbers (and issue 12) use
    python -m bench.step --threads 2 --rounds 5 --out bench/results/step.json
    python -m bench.step --granularity per_tensor --bits 3
    python -m bench.step --quick                  # tiny random LLaMA, seconds (CI)
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/step.py`
    # the repo root first, and not bench/ itself (bench/kernels.py would hide HF's kernels)
    sys.path[:] = [str(Path(__file__).resolve().parents[1]),
                   *(p for p in sys.path if p != str(Path(__file__).resolve().parent))]

from bench.harness import REPO, Case, env_info, format_table, run_interleaved, write_rows
from bench.phases import phase_rows, profile_phases
from edkm.config import GRANULARITIES
from edkm.train.config import TrainConfig, load_config

DEFAULT_CONFIG = REPO / "configs" / "smollm2-135m-4bit.yaml"
CPU_THREADS = 1  # as bench/speed.py (its CPU_THREADS note has the measurement)
# --quick: the tiny random LLaMA of configs/tiny.yaml (hidden 64, 2 layers, byte tokenizer)
# with the preset's DKM settings, 2 windows of 32 tokens, 2 Fisher windows.
QUICK_OVERRIDES = ("model.source=tiny", "model.tiny_hidden=64", "model.tiny_layers=2", "data.seq_len=32",
                   "data.max_train_windows=64", "data.heldout_windows=2", "data.importance_windows=2",
                   "optim.batch_size=2")
COLUMNS = ["case", "median_s", "min_s", "n", "ratio_to_plain", "status"]

log = logging.getLogger("bench.step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="preset YAML whose model, data, dkm and optim settings are used (default: the 4-bit SmolLM2 one)")
    p.add_argument("--bits", type=int, default=None, help="override dkm.bits")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None, help="override dkm.granularity")
    p.add_argument("--group-size", type=int, default=None, help="override dkm.group_size (output channels per LUT)")
    p.add_argument("--max-iters", type=int, default=None, help="override dkm.max_iters (DKM iterations per step)")
    p.add_argument("--batch-size", type=int, default=None, help="override optim.batch_size (windows per step)")
    p.add_argument("--seq-len", type=int, default=None, help="override data.seq_len (tokens per window)")
    p.add_argument("--importance-windows", type=int, default=None,
                   help="override data.importance_windows (Fisher windows weighting DKM; 0 = unweighted)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="further config overrides, as `edkm train` takes them (e.g. dkm.backend=torch)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch.set_num_threads (default: {CPU_THREADS} on CPU; untouched on GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed interleaved rounds, one step of each per round (default 3; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each model first (default 1)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile one more DKM step and break its DKM share into phases (default on)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny random LLaMA, 1 round, seconds")
    p.add_argument("--out", default=None, help="write the result as one JSON object (one line) to this file")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    for name in ("bits", "group_size", "max_iters", "batch_size", "seq_len", "threads", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value!r}")
    for name in ("warmup", "importance_windows"):
        value = getattr(args, name)
        if value is not None and value < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {value!r}")
    return args


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The preset with the flags applied (``load_config`` validates every value)."""
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    for flag, key in (("bits", "dkm.bits"), ("granularity", "dkm.granularity"), ("group_size", "dkm.group_size"),
                      ("max_iters", "dkm.max_iters"), ("batch_size", "optim.batch_size"), ("seq_len", "data.seq_len"),
                      ("importance_windows", "data.importance_windows")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, [*overrides, *args.set])


def build_models(config: TrainConfig, device: torch.device):
    """``(plain, dkm, batch, info)``: two copies of the model (the second prepared) and the batch."""
    from edkm import fisher_importance, prepare
    from edkm.preparation import clustered_layers
    from edkm.train.data import load_model_and_windows

    model, windows = load_model_and_windows(config)
    bs = config.optim.batch_size
    if windows.train.shape[0] < bs:
        raise ValueError(f"need {bs} training windows of {config.data.seq_len} tokens, the corpus gives "
                         f"{windows.train.shape[0]}")
    batch = windows.train[:bs].to(device)
    plain = copy.deepcopy(model)
    n_imp = config.data.importance_windows
    importance = None
    if n_imp:
        if n_imp > windows.train.shape[0]:
            raise ValueError(f"importance_windows={n_imp} but only {windows.train.shape[0]} training windows exist")
        importance = fisher_importance(model.to(device), windows.train[:n_imp].to(device), config.dkm)
    dkm_model = prepare(model, config.dkm, importance=importance)
    del importance
    layers = list(clustered_layers(dkm_model))
    groups = sum(p.groups for _, _, p in layers)
    info = {"clustered_layers": len(layers), "lut_groups": groups,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "clustered_weights": sum(m.parametrizations.weight.original.numel() for _, m, _ in layers)}
    return plain.to(device).train(), dkm_model.to(device).train(), batch, info


def train_step(model: torch.nn.Module, batch: torch.Tensor, config: TrainConfig):
    """A zero-argument callable doing one training step of ``model`` on ``batch`` (AdamW from the preset)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    clip = config.optim.grad_clip

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cpu_timed(fn, store: list[float]):
    """``fn`` that also appends the process CPU seconds of each call to ``store`` (with one
    thread on a loaded machine, CPU seconds are what the step costs, wall seconds are not)."""
    def timed() -> None:
        t0 = time.process_time()
        fn()
        store.append(time.process_time() - t0)
    return timed


def resolved_backend(config: TrainConfig, dkm_model: torch.nn.Module) -> str:
    """Who runs the table path for the first clustered layer (importance keeps it off Triton)."""
    from edkm.functional import resolve_backend
    from edkm.preparation import clustered_layers

    for _, module, param in clustered_layers(dkm_model):
        points = param.points(module.parametrizations.weight.original.detach())
        backend = resolve_backend(config.dkm.backend, points, config.dkm.uniquify)  # points are cast already
        return "torch" if backend == "triton" and getattr(param, "importance", None) is not None else backend
    return "none"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is None and device.type == "cpu":
        args.threads = CPU_THREADS
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = build_config(args)
    torch.manual_seed(config.run.seed)
    plain, dkm_model, batch, info = build_models(config, device)
    cpu_s: dict[str, list[float]] = {"plain": [], "dkm": []}
    cases = [Case(name, cpu_timed(train_step(m, batch, config), cpu_s[name]))
             for name, m in (("plain", plain), ("dkm", dkm_model))]
    run_interleaved(cases, device, warmup=args.warmup, repeats=args.rounds, single=True)
    cpu = {k: statistics.median(v[args.warmup:]) for k, v in cpu_s.items()
           if len(v) > args.warmup and device.type == "cpu"}  # host seconds mean nothing for CUDA work
    st = {c.name: c.stats() for c in cases}
    failed = [f"{c.name}: {c.skip}" for c in cases if c.skip]
    if failed:
        print("; ".join(failed), file=sys.stderr)
        return 1
    plain_s, dkm_s = st["plain"]["median_s"], st["dkm"]["median_s"]
    ratio = dkm_s / plain_s
    profile = None
    if args.profile:
        step = cases[1].fn
        profile = profile_phases(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    env = env_info(device)
    dkm_cfg = config.dkm
    result = {
        "bench": "step", "plain_s": plain_s, "dkm_s": dkm_s, "ratio": ratio,
        "plain_min_s": st["plain"]["min_s"], "dkm_min_s": st["dkm"]["min_s"],
        "ratio_min": st["dkm"]["min_s"] / st["plain"]["min_s"],
        "plain_cpu_s": cpu.get("plain"), "dkm_cpu_s": cpu.get("dkm"),
        "ratio_cpu": cpu["dkm"] / cpu["plain"] if len(cpu) == 2 else None,
        "plain_times_s": cases[0].times_s, "dkm_times_s": cases[1].times_s, "rounds": args.rounds,
        "warmup": args.warmup, "commit": env["git_commit"],
        "model": config.model.source, "config": str(args.config), "quick": args.quick,
        "batch_size": config.optim.batch_size, "seq_len": config.data.seq_len,
        "bits": dkm_cfg.bits, "granularity": dkm_cfg.granularity,
        "group_size": dkm_cfg.group_size if dkm_cfg.granularity == "per_grouped_channel" else None,
        "max_iters": dkm_cfg.max_iters, "tau": dkm_cfg.tau, "cluster_dtype": dkm_cfg.cluster_dtype,
        "uniquify": dkm_cfg.uniquify, "backend": resolved_backend(config, dkm_model),
        "importance_windows": config.data.importance_windows, "grad_clip": config.optim.grad_clip,
        **info, "profile": profile, **env,
    }

    print(f"one training step (fwd + bwd + AdamW) of {config.model.source}, batch {config.optim.batch_size} x "
          f"{config.data.seq_len} tokens; DKM: {dkm_cfg.bits} bits, {dkm_cfg.granularity}"
          f"{f' (group {dkm_cfg.group_size})' if result['group_size'] else ''}, {dkm_cfg.max_iters} iters, "
          f"cluster_dtype {dkm_cfg.cluster_dtype}, backend {result['backend']}, importance windows "
          f"{config.data.importance_windows}; {info['clustered_layers']} layers, {info['lut_groups']} LUTs")
    print(f"device: {env['device_name']} ({env['threads']} threads, load1 {env['load1']}); torch {env['torch']}, "
          f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}; {args.rounds} interleaved rounds "
          f"after {args.warmup} warm-up")
    rows = [{"case": c.name, **st[c.name], "ratio_to_plain": st[c.name]["median_s"] / plain_s,
             "status": "ok"} for c in cases]
    print(format_table(rows, COLUMNS))
    print(f"ratio dkm/plain = {ratio:.3g} (medians), {result['ratio_min']:.3g} (minima)"
          + (f", {result['ratio_cpu']:.3g} (process CPU seconds: robust to other processes' load)"
             if result["ratio_cpu"] else ""))
    if profile is not None:
        print(f"\nprofile of one DKM step (self CPU time, Python stacks on): {profile['total_s']:.3g} s profiled, "
              f"{profile['dkm_s']:.3g} s of it DKM ({profile['idle_threads_s']:.3g} s of idle helper threads left "
              f"out); aten_s = time inside aten ops (the rest: Python, dispatch, autograd); est_s = share x "
              f"timed (dkm_s - plain_s)")
        extra = dkm_s - plain_s if dkm_s > plain_s else None  # noise can make the difference negative
        print(format_table(phase_rows(profile, extra),
                           ["phase", "profiled_s", "aten_s", "share_of_dkm", "est_s", "aten_ops", "top_op"]))
    if args.out:
        write_rows(args.out, [result], append=False)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
