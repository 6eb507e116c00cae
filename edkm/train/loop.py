"""The training loop: load a LLaMA, cluster it with DKM while fine-tuning, evaluate, export.

`train(config)` runs one job end to end: perplexity before, `edkm.prepare`, AdamW steps
with an LR (and optional tau) schedule, crash-safe checkpoints, perplexity after (hard
LUT weights), `edkm.finalize` and the packed export. Multi-GPU runs go through
accelerate (``accelerate launch -m edkm train ...``); accelerate owns devices, DDP and
autocast, and this module never spawns processes.

Data order is a seeded permutation of the training windows, so the data position of a
checkpoint is just the number of micro-batches consumed: ``--resume`` continues with the
exact batches, RNG states, optimizer and scheduler of the last checkpoint.

Progress goes through a callback (the CLI draws a tqdm bar); metrics go to
``metrics.jsonl`` in the output directory, one JSON object per logged step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edkm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from edkm.export import export_compressed
from edkm.importance import fisher_importance
from edkm.preparation import centroid_drift, clustered_layers, finalize, prepare
from edkm.train.config import TrainConfig
from edkm.train.data import load_model_and_windows

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced."""

    ppl_before: float
    ppl_after: float
    steps: int
    output_dir: Path
    export_path: Path | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)


def train(config: TrainConfig, resume: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Run a clustering fine-tune end to end.

    Args:
        config: The full config.
        resume: Continue from the run directory's latest checkpoint (an error if none).
        on_step: Called with each logged metrics dict (the CLI's progress display).
        stop_after: Stop (after checkpointing) once this many steps are done in this
            process; used to simulate interruptions. None runs to ``max_steps``.
    Returns:
        A `TrainResult`.
    """
    from accelerate import Accelerator

    out = Path(config.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # cpu=True on machines without CUDA: accelerate then sets up multi-CPU (gloo) runs
    # from torchrun / accelerate launch; without it, each CPU rank trains alone.
    acc = Accelerator(gradient_accumulation_steps=config.optim.grad_accum, mixed_precision=config.optim.mixed_precision,
                      cpu=not torch.cuda.is_available())
    _seed_all(config.run.seed)
    model, windows = load_model_and_windows(config)
    heldout = windows.heldout[: config.data.heldout_windows or None]
    state = None
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out} (no 'latest' file); start without --resume")
        state, manifest = load_checkpoint(ckpt)
        _check_same_config(manifest["meta"], config, acc.num_processes)
        ppl_before = manifest["meta"]["ppl_before"]
        log.info("resuming from %s (step %d)", ckpt, manifest["step"])
    else:
        ppl_before = _perplexity(model, heldout, acc)
        log.info("perplexity before clustering: %.3f on %d held-out tokens", ppl_before, heldout.numel())
    importance = None
    if config.data.importance_windows:
        n = config.data.importance_windows
        if n > windows.train.shape[0]:
            raise ValueError(f"data.importance_windows={n} but only {windows.train.shape[0]} training windows exist")
        importance = fisher_importance(model.to(acc.device), windows.train[:n], config.dkm)
    prepare(model, config.dkm, importance=importance)
    del importance  # the layers keep a bf16 copy; free the fp32 Fisher
    model.to(acc.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                            weight_decay=config.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    step, micro = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, micro = state["step"], state["micro"]
        _set_rng(state["rng"])
    model, opt = acc.prepare(model, opt)
    metrics_path = out / "metrics.jsonl"
    if acc.is_main_process:  # fresh run: empty; resume: drop rows logged after the checkpoint
        kept = [] if not resume or not metrics_path.exists() else [
            line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    order = _order(windows.train.shape[0], config.run.seed)
    bs, world = config.optim.batch_size, acc.num_processes
    metrics: list[dict[str, Any]] = []
    done_here = 0
    model.train()
    while step < config.optim.max_steps:
        _set_tau(model, config, step)
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        loss_sum, tokens = 0.0, 0
        for _ in range(config.optim.grad_accum):
            ids = _batch(windows.train, order, micro, bs, world, acc.process_index).to(acc.device)
            micro += 1
            with acc.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                acc.backward(loss)
                if acc.sync_gradients and config.optim.grad_clip > 0:
                    acc.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss_sum += loss.item()
            tokens += ids.numel() * world
        sched.step()
        step += 1
        done_here += 1
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": loss_sum / config.optim.grad_accum, "lr": sched.get_last_lr()[0],
               "tau": _tau_at(config, step - 1), "step_s": dt, "tokens_per_s": tokens / dt,
               "peak_mem_bytes": _peak_mem(), "centroid_drift": centroid_drift(acc.unwrap_model(model))}
        if step % config.run.log_every == 0 or step == config.optim.max_steps:
            metrics.append(row)
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if on_step:
                on_step(row)
        last = step == config.optim.max_steps or (stop_after is not None and done_here >= stop_after)
        if acc.is_main_process and ((config.run.save_every and step % config.run.save_every == 0) or last):
            save_checkpoint(out, step, {
                "model": acc.unwrap_model(model).state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "micro": micro, "rng": _get_rng(),
            }, meta={"config": config.to_dict(), "ppl_before": ppl_before, "world_size": world},
                keep=config.run.keep_checkpoints)
        acc.wait_for_everyone()
        if last and step < config.optim.max_steps:
            return TrainResult(ppl_before, float("nan"), step, out, metrics=metrics)
    model = acc.unwrap_model(model)
    ppl_after = _perplexity(model, heldout, acc)
    log.info("perplexity after clustering (hard LUT weights): %.3f", ppl_after)
    result = TrainResult(ppl_before, ppl_after, step, out, metrics=metrics)
    if config.run.export and acc.is_main_process:
        finalize(model)
        result.export_path = out / "model.edkm.safetensors"
        result.sizes = export_compressed(model.cpu(), result.export_path)
    summary = {"ppl_before": ppl_before, "ppl_after": ppl_after, "steps": step, "sizes": result.sizes,
               "heldout_tokens": heldout.numel()}
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return result


def _perplexity(model: torch.nn.Module, windows: torch.Tensor, acc) -> float:
    from edkm.evaluate import perplexity

    with acc.autocast():
        return perplexity(model, windows.to(acc.device), batch_size=4)


def _order(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _batch(train: torch.Tensor, order: torch.Tensor, micro: int, bs: int, world: int, rank: int) -> torch.Tensor:
    """Micro-batch ``micro`` of this rank: consecutive slices of the permutation, wrapping
    around (and reshuffling per epoch) when the data runs out."""
    n = order.numel()
    start = (micro * world + rank) * bs
    idx = []
    for i in range(start, start + bs):
        epoch, pos = divmod(i, n)
        perm = order if epoch == 0 else _order(n, epoch * 7919 + int(order[0]))
        idx.append(int(perm[pos]))
    return train[idx]


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    o = config.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        frac = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
        if o.schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if o.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 1.0

    return f


def _tau_at(config: TrainConfig, step: int) -> float:
    start, end = config.optim.tau_start, config.dkm.tau
    if start is None or config.optim.max_steps <= 1:
        return end
    frac = min(1.0, step / (config.optim.max_steps - 1))
    return start * (end / start) ** frac


def _set_tau(model: torch.nn.Module, config: TrainConfig, step: int) -> None:
    if config.optim.tau_start is None:
        return
    tau = _tau_at(config, step)
    for _, _, p in clustered_layers(model):
        if p.config.tau != tau:
            p.config = p.config.replace(tau=tau)


def _check_same_config(meta: dict[str, Any], config: TrainConfig, world: int) -> None:
    saved, now = TrainConfig.from_dict(meta["config"]).to_dict(), config.to_dict()  # defaults filled in
    # Run length and cadence may change on resume; what defines the model and the data
    # position (batch size, accumulation, number of ranks) may not.
    for section in ("model", "dkm", "data"):
        if saved.get(section) != now[section]:
            raise ValueError(f"--resume: config section {section!r} differs from the checkpoint's "
                             f"({saved.get(section)} vs {now[section]}); resume with the same config")
    for key in ("batch_size", "grad_accum"):
        if saved["optim"][key] != now["optim"][key]:
            raise ValueError(f"--resume: optim.{key} was {saved['optim'][key]}, now {now['optim'][key]}; "
                             "the data position would not match")
    if meta.get("world_size", world) != world:
        raise ValueError(f"--resume: the checkpoint was written by {meta['world_size']} processes, "
                         f"now {world}; the data position would not match")


def _peak_mem() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _get_rng() -> dict[str, Any]:
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
