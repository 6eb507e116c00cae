"""The training loop: load a LLaMA, cluster it with DKM while fine-tuning, evaluate, export.

`train(config)` runs one job end to end with the steps of `edkm.train.steps`:
perplexity before, (resume), the float model's side (training windows of ``data.source``,
the ``kd`` teacher, its numbers on ``data.eval_domains``), calibrate, prepare, optimizer
steps, held-out evaluation, crash-safe checkpoints, perplexity after (hard LUT weights),
the per-domain report (`edkm.train.domains`, in ``summary.json``), finalize and the packed
export. Multi-GPU runs go through accelerate (``accelerate launch -m edkm train ...``);
accelerate owns devices, DDP and autocast, and this module never spawns processes.
With ``optim.fsdp=true`` (launched by torchrun / accelerate launch) the model, gradients and
AdamW state, and the frozen teacher, are sharded with FSDP2 (`edkm.train.fsdp`): checkpoints
are sharded (every rank writes its shards; resume and rollback reload them on every rank),
evaluation and the domain report run on every rank (rank 0 writes), the export is gathered
to rank 0.

Data order is a seeded permutation of the training windows, so the data position of a
checkpoint is just the number of micro-batches consumed: ``--resume`` continues with the
exact batches, RNG states, optimizer and scheduler of the last checkpoint.

Safety: one run per output directory (`edkm.train.lock.RunLock`); stale temporary
checkpoint files are removed at start-up; after every optimizer step the divergence
guard (`edkm.train.guard`) checks loss, gradient norm and weights, and a diverged state
is never written: the run stops (`DivergenceError`) or, with
``run.on_divergence=rollback``, reloads the last good checkpoint with half the lr.
Every checkpoint carries its held-out score (``run.best_by``: the KL from the float model
for the ``kd`` losses, perplexity for ``ce``); pruning keeps the best one, and the export
takes it when it beats the final weights.

Progress goes through a callback (the CLI draws a tqdm bar); metrics go to
``metrics.jsonl`` in the output directory, one JSON object per logged step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edkm.train import fsdp
from edkm.train.checkpoint import (
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    manifest_score,
    read_manifest,
    remove_stale_tmp,
    reset_best,
    save_checkpoint,
)
from edkm.train.config import TrainConfig
from edkm.train.data import data_order, load_inputs
from edkm.train.domains import HELDOUT, domain_report
from edkm.train.guard import DivergenceError, DivergenceGuard
from edkm.train.lock import RunLock
from edkm.train.resume import SCHEDULE_KEYS
from edkm.train.schedule import rebase_lr
from edkm.train.sharded import from_rank0
from edkm.train.state import TrainState, restore, seed_all, snapshot
from edkm.train.steps import (
    Run,
    calibrate,
    calibration_hessians,
    evaluate,
    export_model,
    float_side,
    heldout_score,
    heldout_scores,
    prepare_model,
    resume_point,
    train_step,
)
from edkm.train.topk import heldout_reference, teacher_topk

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced.

    ``ppl_after`` is the final model's held-out perplexity (NaN for a run stopped early);
    ``export_step`` the step whose weights were exported (the best scored one);
    ``domains`` the per-domain report of those weights (`edkm.train.domains.domain_report`).
    """

    ppl_before: float
    ppl_after: float
    steps: int
    output_dir: Path
    export_path: Path | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    export_step: int | None = None
    rollbacks: int = 0
    domains: dict[str, Any] = field(default_factory=dict)


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
        A `TrainResult`. Raises `DivergenceError` when training diverges (and cannot
        roll back), `RunLockedError` when another run uses the output directory.
    """
    out = Path(config.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = fsdp.accelerator(config)
    with RunLock(out) if acc.is_main_process else contextlib.nullcontext():
        if acc.is_main_process:
            remove_stale_tmp(out)
        return _train(config, acc, out, resume, on_step, stop_after)


def _train(config: TrainConfig, acc: Any, out: Path, resume: bool, on_step: Callable | None,
           stop_after: int | None) -> TrainResult:
    run, ts, guard, meta = _start(config, acc, out, resume)
    ts, metrics, last = _steps(run, ts, guard, meta, on_step, stop_after)
    if ts.step < config.optim.max_steps:  # stopped early (stop_after): checkpointed, not evaluated
        return TrainResult(meta["ppl_before"], float("nan"), ts.step, out, metrics=metrics, rollbacks=ts.rollbacks)
    return _finish(run, ts, meta["ppl_before"], last, metrics)


def _start(config: TrainConfig, acc: Any, out: Path, resume: bool) -> tuple[Run, TrainState, DivergenceGuard, dict]:
    """Model, windows, perplexity before, (resume), calibrate, prepare: everything up to
    the first step. Returns the run, its counters, the guard and the checkpoint meta."""
    seed_all(config.run.seed)
    model, tokenizer, windows = load_inputs(config)
    heldout = windows.heldout[: config.data.heldout_windows or None]
    saved, manifest, applied = resume_point(out, config, acc.num_processes) if resume else (None, None, {})
    if manifest is not None:
        ppl_before = manifest["meta"]["ppl_before"]
    else:
        ppl_before = evaluate(model, heldout, acc)
        log.info("perplexity before clustering: %.3f on %d held-out tokens", ppl_before, heldout.numel())
    windows, teacher, domains = float_side(model, tokenizer, windows, heldout, config, acc.device, ppl_before)
    order = data_order(windows.train.shape[0], config.run.seed)
    topk, heldout_logits = None, None
    if config.optim.kd_topk:  # the float model's top-k logits to disk now; it is not kept for the loss
        topk = teacher_topk(model, windows.train, order, config, out, acc)
        if teacher is None and config.scores_kl:
            heldout_logits = heldout_reference(model, heldout, domains)
    importance = calibrate(model, windows.train, config, acc.device)
    # the compensated weights of a resumed run are in its checkpoint
    hessians = None if resume else calibration_hessians(model, tokenizer, windows.train, config, acc.device)
    model, opt, sched = prepare_model(model, config, importance, acc.device, hessians)
    del importance, hessians  # the layers keep a bf16 copy of the Fisher; the Hessians are spent
    guard = DivergenceGuard(loss_spike=config.run.loss_spike, max_weight_abs=config.run.max_weight_abs,
                            heldout_reference=None if config.optim.loss == "ce" else math.log(ppl_before))
    ts = TrainState()
    if saved is not None:
        ts = restore(saved, model, opt, sched, guard)
    if config.optim.fsdp:
        fsdp.shard_ready(acc, model)
        teacher = fsdp.shard_teacher(teacher)
    model, opt = acc.prepare(model, opt)
    if resume and config.optim.fsdp:  # sharded: restored into the sharded model, every rank
        ts = fsdp.load(latest_checkpoint(out), model, opt, sched, guard)
    if resume:
        _apply_changes(applied, opt, sched, config, ts)
    run = Run(config, acc, model, opt, sched, windows, heldout, order, out, teacher, domains, topk, heldout_logits)
    history = (manifest or {}).get("meta", {}).get("resumed", []) + (
        [{"step": ts.step, "applied": {k: list(v) for k, v in applied.items()}}] if resume else [])
    meta = {"config": config.to_dict(), "ppl_before": ppl_before, "world_size": acc.num_processes, "resumed": history}
    if acc.is_main_process:
        _keep_metrics(out / "metrics.jsonl", ts.step if resume else 0)
        if not resume:
            reset_best(out)
        if config.run.on_divergence == "rollback" and not resume and not config.optim.fsdp:  # a good state
            save_checkpoint(out, 0, snapshot(acc.unwrap_model(model), opt, sched, ts, guard), meta,
                            keep=config.run.keep_checkpoints)
    acc.wait_for_everyone()  # the other ranks read 'best' next
    if config.run.on_divergence == "rollback" and not resume and config.optim.fsdp:  # every rank, sharded
        fsdp.save(out, model, opt, sched, ts, guard, meta, config.run.keep_checkpoints, None)
    return run, ts, guard, meta


def _steps(run: Run, ts: TrainState, guard: DivergenceGuard, meta: dict, on_step: Callable | None,
           stop_after: int | None) -> tuple[TrainState, list[dict[str, Any]], tuple[float, float, Any]]:
    """Optimizer steps until ``max_steps`` (or ``stop_after`` in this process): guard,
    evaluate, log, checkpoint. Returns the counters, the logged rows and the last step's
    ``(held-out ppl, score, Fidelity or None)`` (nan / None when it was not evaluated)."""
    config, acc, out = run.config, run.acc, run.out
    by = config.score_by
    best = _best_score(out, by)  # inf for a fresh run: _start forgot an earlier run's best
    metrics: list[dict[str, Any]] = []
    done_here, ppl, score, fid = 0, math.nan, math.nan, None
    run.model.train()
    while ts.step < config.optim.max_steps:
        row, norm, bad_grad = train_step(run, ts)
        done_here += 1
        last = ts.step == config.optim.max_steps or (stop_after is not None and done_here >= stop_after)
        save = bool(config.run.save_every and ts.step % config.run.save_every == 0) or last
        ppl, score, fid = math.nan, math.nan, None
        reason = guard.check(row["loss"], norm, acc.unwrap_model(run.model), bad_grad)
        if reason is None and (save or (config.run.eval_every and ts.step % config.run.eval_every == 0)):
            ppl, kl, score, fid = _heldout(run)
            row["heldout_ppl"] = ppl
            if kl is not None:
                row["heldout_kl"] = kl
            reason = guard.check_heldout(ppl)
            if reason is None and not math.isfinite(score):
                reason = f"the held-out {by} is {score}"
        if _any_process(acc, reason is not None):
            ts = _rollback(run, ts, guard, reason or "another process saw a diverged state")
            continue
        if config.run.domains_every and ts.step % config.run.domains_every == 0 and _scores_here(run):
            row["domains"] = _curve_point(run)
        if ts.step % config.run.log_every == 0 or ts.step == config.optim.max_steps or "domains" in row:
            metrics.append(row)
            if acc.is_main_process:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            if on_step:
                on_step(row)
        kept = None if math.isnan(score) else score
        if config.optim.fsdp and (save or score < best):  # every rank writes its shards
            fsdp.save(out, run.model, run.opt, run.sched, ts, guard, meta, config.run.keep_checkpoints, kept, by)
        elif acc.is_main_process and (save or score < best):  # a new best at an eval step is kept too
            save_checkpoint(out, ts.step, snapshot(acc.unwrap_model(run.model), run.opt, run.sched, ts, guard), meta,
                            keep=config.run.keep_checkpoints, score=kept, score_by=by)
        best = min(best, score) if not math.isnan(score) else best
        acc.wait_for_everyone()
        if last:
            break
    return ts, metrics, (ppl, score, fid)


def _heldout(run: Run) -> tuple[float, float | None, float, Any]:
    """``(perplexity, KL or None, score, Fidelity or None)`` of the current weights on the
    held-out windows; the score is the one of ``run.best_by`` (every rank under FSDP2; rank
    0's numbers). The `edkm.evaluate.Fidelity` of the KL pass is for the final report to
    reuse; None under FSDP2, where it holds only this rank's numbers."""
    config = run.config
    ppl, kl, fid = heldout_scores(run.acc.unwrap_model(run.model), run.teacher, run.heldout, run.acc,
                                  config.scores_kl, run.heldout_logits)
    if config.optim.fsdp:
        ppl, kl, fid = *from_rank0((ppl, kl)), None
    return ppl, kl, heldout_score(config, ppl, kl), fid


def _curve_point(run: Run) -> dict[str, dict[str, float]]:
    """``{domain: {ppl_ratio, kl, top1_agreement}}`` of the current weights (the fidelity
    curve of ``run.domains_every``), on the windows and float numbers of the final report."""
    with run.acc.autocast():
        report = domain_report(run.acc.unwrap_model(run.model), run.teacher, run.domains)
    keys = ("ppl_ratio", "kl", "top1_agreement")
    return {name: {k: r["after"][k] for k in keys} for name, r in report.items()}


def _finish(run: Run, ts: TrainState, ppl_before: float, last: tuple[float, float, Any], metrics: list) -> TrainResult:
    """Perplexity after (the last step's), export of the best checkpoint, summary."""
    config, acc, out = run.config, run.acc, run.out
    model = acc.unwrap_model(run.model)
    ppl_after, score, fid = last
    if math.isnan(ppl_after):  # no step ran here (resumed at max_steps): score the final weights
        ppl_after, _, score, fid = _heldout(run)
    log.info("perplexity after clustering (hard LUT weights): %.3f", ppl_after)
    result = TrainResult(ppl_before, ppl_after, ts.step, out, metrics=metrics, rollbacks=ts.rollbacks)
    if config.run.export and (acc.is_main_process or config.optim.fsdp):
        result.export_step = _load_best(run, model, ts.step, score)
    if _scores_here(run):  # the exported (best) weights when exporting, else the final ones
        # The last step's held-out pass scored these very weights when they are the final ones.
        same = result.export_step in (None, ts.step) and fid is not None
        with acc.autocast():
            result.domains = domain_report(model, run.teacher, run.domains, known={HELDOUT: fid} if same else None)
    if config.run.export and config.optim.fsdp:  # gathered to rank 0, exported there
        result.export_path = out / "model.edkm.safetensors"
        result.sizes = fsdp.export(model, config, result.export_path)
    elif config.run.export and acc.is_main_process:
        result.export_path = out / "model.edkm.safetensors"
        result.sizes = export_model(model, result.export_path)
    summary = {"ppl_before": ppl_before, "ppl_after": ppl_after, "steps": ts.step, "sizes": result.sizes,
               "heldout_tokens": run.heldout.numel(), "export_step": result.export_step, "rollbacks": ts.rollbacks,
               "domains": result.domains, "domains_step": result.export_step or ts.step}
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return result


def _apply_changes(applied: dict[str, tuple], opt: Any, sched: Any, config: TrainConfig, ts: TrainState) -> None:
    """Apply the config changes a resume allows (see `edkm.train.resume`) and log each."""
    for key, (old, new) in applied.items():
        log.info("--resume: %s changed %r -> %r (applied)", key, old, new)
    if "optim.weight_decay" in applied:
        for g in opt.param_groups:
            g["weight_decay"] = config.optim.weight_decay
    if any(k in applied for k in SCHEDULE_KEYS):
        lr = rebase_lr(opt, sched, config, ts.lr_scale)
        log.info("--resume: scheduler re-based on optim.lr=%g (x%g after rollbacks); lr at step %d is %.3e",
                 config.optim.lr, ts.lr_scale, ts.step, lr)


def _rollback(run: Run, ts: TrainState, guard: DivergenceGuard, reason: str) -> TrainState:
    """Reload the last good checkpoint with half the lr, or raise `DivergenceError`."""
    config, acc = run.config, run.acc
    ckpt = latest_checkpoint(run.out)
    where = f"the last good checkpoint is {ckpt}" if ckpt is not None else "no checkpoint was written yet"
    message = f"training diverged at step {ts.step}: {reason}; this state was not saved ({where})"
    if config.run.on_divergence != "rollback" or ckpt is None or ts.rollbacks >= config.run.max_rollbacks:
        if config.run.on_divergence == "rollback":
            message += f"; {ts.rollbacks} rollback(s) of run.max_rollbacks={config.run.max_rollbacks} used"
        else:
            message += "; lower optim.lr, or set run.on_divergence=rollback"
        raise DivergenceError(message)
    rollbacks = ts.rollbacks + 1
    if config.optim.fsdp:  # every rank restores its shards
        ts = fsdp.load(ckpt, run.model, run.opt, run.sched, guard)
    else:
        saved, _ = load_checkpoint(ckpt)
        ts = restore(saved, acc.unwrap_model(run.model), run.opt, run.sched, guard)
    ts.rollbacks, ts.lr_scale = rollbacks, 0.5**rollbacks
    lr = rebase_lr(run.opt, run.sched, config, ts.lr_scale)
    log.warning("%s: rolled back to step %d with lr x%g (now %.3e), rollback %d of %d", message, ts.step,
                ts.lr_scale, lr, rollbacks, config.run.max_rollbacks)
    if acc.is_main_process:
        _keep_metrics(run.out / "metrics.jsonl", ts.step)
    return ts


def _scores_here(run: Run) -> bool:
    """Whether this process runs the domain scoring: rank 0, or every rank under FSDP2
    (each forward pass all-gathers the sharded weights; only rank 0 writes the results)."""
    return run.acc.is_main_process or run.config.optim.fsdp


def _any_process(acc: Any, flag: bool) -> bool:
    """True when ``flag`` holds on any process (all ranks take the same branch)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)


def _keep_metrics(path: Path, step: int) -> None:
    """Drop metrics rows logged after ``step`` (all of them for a fresh run)."""
    kept = [] if step == 0 or not path.exists() else [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _best_score(out: Path, by: str) -> float:
    """The best checkpoint's score of kind ``by``; inf when there is none to compare with."""
    best = best_checkpoint(out)
    score = manifest_score(read_manifest(best), by) if best is not None else None
    return math.inf if score is None else score


def _load_best(run: Run, model: torch.nn.Module, step: int, score: float) -> int:
    """Load the best checkpoint's weights into ``model`` when they beat the final ones
    (final held-out ``score`` of kind ``run.config.score_by``; under FSDP2 on every rank,
    from the sharded checkpoint).

    Returns:
        The step whose weights ``model`` now holds.
    """
    best, by = best_checkpoint(run.out), run.config.score_by
    if best is None:
        return step
    manifest = read_manifest(best)
    best_score = manifest_score(manifest, by)
    if manifest["step"] == step or best_score is None or not best_score < score:
        return step
    log.warning("the final model (step %d, held-out %s %.4g) is worse than step %d (%.4g): exporting step %d",
                step, by, score, manifest["step"], best_score, manifest["step"])
    if run.config.optim.fsdp:
        fsdp.load_weights(best, run.model, run.opt)
        return manifest["step"]
    state, _ = load_checkpoint(best)
    model.load_state_dict(state["model"])
    return manifest["step"]
