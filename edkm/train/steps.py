"""The trainer's named steps; `edkm.train.loop.train` calls them in this order.

    resume_point   the checkpoint to continue from, its config changes checked
    float_side     what comes from the float model before clustering: the training windows
                   of ``data.source``, the teacher, the evaluation domains' reference numbers
    make_teacher   the frozen float model the ``kd`` losses distil from (None for ``ce``)
    calibrate      diagonal Fisher of some training windows (sensitivity-aware DKM)
    prepare_model  `edkm.prepare`, ``optim.freeze``, AdamW and the LR schedule
    train_step     one optimizer step over ``grad_accum`` micro-batches (loss of
                   ``optim.loss``: `step_loss`), with its metrics
    evaluate       held-out perplexity (hard LUT weights)
    heldout_scores held-out perplexity and KL from the teacher (``run.best_by=kl`` / ``loss``)
    export_model   `edkm.finalize` and the packed export

Each takes what it needs explicitly; none keeps state between calls. `Run` bundles the
objects the steps share (accelerator, model, optimizer, windows).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edkm.compensate import compensate, input_hessians
from edkm.distill import distill_loss, topk_distill_loss
from edkm.export import export_compressed
from edkm.hub.text import TokenWindows
from edkm.importance import fisher_importance
from edkm.preparation import centroid_drift, finalize, prepare
from edkm.train.checkpoint import latest_checkpoint, load_checkpoint, read_manifest
from edkm.train.config import TrainConfig
from edkm.train.data import micro_indices
from edkm.train.guard import PARAM_SUFFIX, first_bad_grad
from edkm.train.resume import config_changes
from edkm.train.schedule import lr_lambda, set_tau, tau_at
from edkm.train.state import TrainState

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What the steps of one run share.

    Args:
        config: The config in effect. acc: The ``accelerate.Accelerator``.
        model: The (accelerate-prepared) model. opt, sched: Optimizer and LR scheduler.
        windows: Training / held-out token windows. heldout: The scored held-out windows.
        order: The data permutation. out: The run directory.
        teacher: The frozen float model of the ``kd`` losses and the report (None when
            the report uses stored float logits; `step_loss` ignores it for ``ce``).
        domains: The evaluation domains with the float model's numbers
            (`edkm.train.domains.reference_domains`).
        topk: ``optim.kd_topk``'s stored teacher logits (`edkm.train.topk.TopKTeacher`).
        heldout_logits: The float model's logits on ``heldout`` for the checkpoints' KL
            when no teacher is resident (`edkm.train.topk.heldout_reference`).
    """

    config: TrainConfig
    acc: Any
    model: torch.nn.Module
    opt: Any
    sched: Any
    windows: TokenWindows
    heldout: torch.Tensor
    order: torch.Tensor
    out: Path
    teacher: torch.nn.Module | None = None
    domains: list = field(default_factory=list)
    topk: Any = None
    heldout_logits: torch.Tensor | None = None


def resume_point(out: Path, config: TrainConfig, world: int) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """Load the latest checkpoint of ``out`` and check the config against it.

    Returns:
        ``(state, manifest, applied)``: the `edkm.train.state.snapshot` dict (None for a
        sharded checkpoint of an ``optim.fsdp`` run, which every rank restores into the
        sharded model: `edkm.train.fsdp.load`), its manifest, and ``{"section.key":
        (old, new)}`` of the config changes to apply. Raises ``FileNotFoundError``
        without a checkpoint, `CheckpointError` for a bad one, `ConfigError` listing
        changes that cannot be applied (``optim.fsdp`` and the world size included).
    """
    from edkm.train.sharded import is_sharded_checkpoint

    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out} (no 'latest' file); start without --resume")
    if is_sharded_checkpoint(ckpt):
        state, manifest = None, read_manifest(ckpt)
    else:
        state, manifest = load_checkpoint(ckpt)
    applied = config_changes(manifest["meta"], config, world)
    log.info("resuming from %s (step %d)", ckpt, manifest["step"])
    return state, manifest, applied


def float_side(model: torch.nn.Module, tokenizer: Any, windows: TokenWindows, heldout: torch.Tensor,
               config: TrainConfig, device: torch.device,
               ppl_before: float | None = None) -> tuple[TokenWindows, torch.nn.Module | None, list]:
    """Everything taken from the float model before `edkm.prepare` clusters it.

    Args:
        model: The float model. tokenizer: Its tokenizer.
        windows: The corpus windows. heldout: The scored held-out windows.
        config: The run's config. device: The run's device.
        ppl_before: The float model's held-out perplexity, when measured already.
    Returns:
        ``(training windows, teacher, domains)``: the windows of ``data.source``
        (`edkm.train.sources.training_windows`), the frozen float model (`make_teacher`'s
        for the ``kd`` losses; for ``ce`` only when the report's float logits would take
        more memory than this copy, else None), and `edkm.train.domains.reference_domains`
        of ``data.eval_domains`` (holding the float model's logits when no teacher is kept).
    """
    from edkm.train.domains import reference_domains
    from edkm.train.sources import training_windows

    teacher = make_teacher(model, config, device)
    budget = None if teacher is not None else sum(t.numel() * t.element_size() for t in model.state_dict().values())
    domains = reference_domains(teacher if teacher is not None else model, config, tokenizer, logit_budget=budget,
                                heldout=heldout, heldout_ppl=ppl_before)
    if teacher is None and domains[0].logits is None:  # a copy of the model is smaller than its logits
        teacher = copy.deepcopy(model).eval().requires_grad_(False).to(device)
    train = training_windows(config, model, tokenizer, windows, device, progress=log.isEnabledFor(logging.INFO))
    return train, teacher, domains


def make_teacher(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module | None:
    """The frozen float model the ``kd`` / ``kd+ce`` losses distil from: a copy of ``model``
    taken before `edkm.prepare`, in eval mode, without gradients, on ``device``.

    Returns:
        The teacher, or None for ``optim.loss=ce`` and with ``optim.kd_topk`` (no copy is
        made, for memory).
    """
    if config.optim.loss == "ce" or config.optim.kd_topk:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False).to(device)


def step_loss(model: torch.nn.Module, teacher: torch.nn.Module | None, ids: torch.Tensor,
              config: TrainConfig, topk: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """The training loss of one micro-batch for ``optim.loss``.

    ``ce``: the model's own next-token cross-entropy (``labels=ids``). ``kd``:
    ``distill_loss(student logits, teacher logits, optim.kd_temperature)`` over every
    position and the full vocabulary, or with ``topk`` `topk_distill_loss` on the
    teacher's stored top-k logits. ``kd+ce``: ``kd + optim.ce_weight * ce``.

    Args:
        model: The student. teacher: The frozen float model (unused for ``ce`` or with ``topk``).
        ids: (B, L) token windows. config: The run's config.
        topk: ``(values, ids, logsumexp)`` of ``ids``: the teacher's (B, L, k) top-k logits and
            their vocabulary ids, and its (B, L) log-normaliser at ``optim.kd_temperature``.
    Returns:
        The scalar loss.
    """
    o = config.optim
    if o.loss == "ce":
        return model(input_ids=ids, labels=ids).loss
    out = model(input_ids=ids, labels=ids if o.loss == "kd+ce" else None)
    if topk is not None:
        values, indices, lse = topk
        loss = topk_distill_loss(out.logits, values, indices, temperature=o.kd_temperature, teacher_logsumexp=lse)
    else:
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits  # (B, L, V)
        loss = distill_loss(out.logits, target, temperature=o.kd_temperature)
    return loss + o.ce_weight * out.loss if o.loss == "kd+ce" else loss


def calibrate(model: torch.nn.Module, train_windows: torch.Tensor, config: TrainConfig,
              device: torch.device) -> dict[str, torch.Tensor] | None:
    """Diagonal Fisher of the first ``data.importance_windows`` training windows, or None.

    Returns:
        ``{layer name: (out, in) importance}`` for `edkm.prepare`, None when off.
    """
    n = config.data.importance_windows
    if not n:
        return None
    if n > train_windows.shape[0]:
        raise ValueError(f"data.importance_windows={n} but only {train_windows.shape[0]} training windows exist")
    return fisher_importance(model.to(device), train_windows[:n], config.dkm)


def calibration_hessians(model: torch.nn.Module, tokenizer: Any, train_windows: torch.Tensor, config: TrainConfig,
                         device: torch.device) -> dict[str, torch.Tensor] | None:
    """Input Hessians of ``data.compensate_windows`` windows of ``data.compensate_text``
    (`edkm.compensate.input_hessians` of the float model), or None when off.

    Teacher text: when the run trains on sampled text too (``data.source`` teacher / mix)
    and samples at least as many windows, the Hessians take the first ones of that draw
    (one cache entry, nothing sampled twice); else a draw of their own. The two are the
    same windows when ``data.compensate_windows`` is a multiple of ``data.teacher_batch``
    (a batch's tokens depend on the seed and its index only)."""
    d = config.data
    n = d.compensate_windows
    if not n:
        return None
    if d.compensate_text == "teacher":
        from edkm.train.sources import sample_from_teacher

        pool = d.teacher_windows if d.source != "corpus" and d.teacher_windows >= n else n
        text = sample_from_teacher(model, tokenizer, pool, config, device, progress=log.isEnabledFor(logging.INFO))[:n]
    else:
        if n > train_windows.shape[0]:
            raise ValueError(f"data.compensate_windows={n} but only {train_windows.shape[0]} training windows exist")
        text = train_windows[:n]
    return input_hessians(model.to(device), text, config.dkm)


def prepare_model(model: torch.nn.Module, config: TrainConfig, importance: dict | None,
                  device: torch.device, hessians: dict | None = None) -> tuple[torch.nn.Module, Any, Any]:
    """Cluster the model's layers (`edkm.prepare`; with ``hessians``, then
    `edkm.compensate` with ``data.compensate_damp``), move it to ``device`` and build AdamW
    with the LR schedule of `edkm.train.schedule.lr_lambda`.

    Returns:
        ``(model, optimizer, scheduler)``.
    """
    prepare(model, config.dkm, importance=importance)
    if hessians is not None:
        compensate(model, hessians, damp=config.data.compensate_damp)
    freeze_parameters(model, config.optim.freeze)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                            weight_decay=config.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))
    return model, opt, sched


def freeze_parameters(model: torch.nn.Module, patterns: tuple[str, ...]) -> int:
    """Set ``requires_grad=False`` on every parameter whose name matches one of ``patterns``
    (`fnmatch`; ``optim.freeze``), after `edkm.prepare`.

    Names are those of ``model.named_parameters(remove_duplicate=False)``, with a clustered
    layer's ``parametrizations.weight.original`` read as ``weight``, so a tied parameter
    answers to each of its names.

    Returns:
        The number of parameter elements frozen. Raises ValueError for a pattern that
        matches no parameter, or one that matches a clustered layer's weight (DKM trains
        it; exclude the layer from clustering instead).
    """
    if not patterns:
        return 0
    named = [(n.replace(PARAM_SUFFIX, ".weight"), n.endswith(PARAM_SUFFIX), p)
             for n, p in model.named_parameters(remove_duplicate=False)]
    frozen: dict[int, torch.nn.Parameter] = {}
    for pattern in patterns:
        hits = [(n, clustered, p) for n, clustered, p in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(n for n, _, _ in named[:4])
            raise ValueError(f"optim.freeze pattern {pattern!r} matches no parameter (names look like {sample}, ...)")
        clustered = [n for n, c, _ in hits if c]
        if clustered:
            raise ValueError(f"optim.freeze pattern {pattern!r} matches the clustered weight {clustered[0]!r}"
                             f"{f' and {len(clustered) - 1} more' if len(clustered) > 1 else ''}: DKM trains it; "
                             "leave it out of clustering (dkm.exclude) to keep it float")
        frozen.update((id(p), p) for _, _, p in hits)
    for p in frozen.values():
        p.requires_grad_(False)
    numel = sum(p.numel() for p in frozen.values())
    log.info("optim.freeze: %d parameter tensors (%d elements) frozen at their float values", len(frozen), numel)
    return numel



def train_step(run: Run, ts: TrainState) -> tuple[dict[str, Any], float | None, str | None]:
    """One optimizer step: ``grad_accum`` micro-batches, clipping, AdamW, scheduler.

    Advances ``ts.step`` and ``ts.micro``.

    Returns:
        ``(row, grad_norm, bad_grad)``: the metrics row of the step, the global gradient
        norm before clipping (None under fp16 autocast, whose loss scaler skips
        overflowing steps itself) and the first parameter with a non-finite gradient.
    """
    config, acc, model = run.config, run.acc, run.model
    set_tau(model, config, ts.step)
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    loss_sum, tokens, world = 0.0, 0, acc.num_processes
    norm, bad = None, None
    for _ in range(config.optim.grad_accum):
        idx = micro_indices(run.order, ts.micro, config.optim.batch_size, world, acc.process_index)
        ids = run.windows.train[idx].to(acc.device)
        ts.micro += 1
        with acc.accumulate(model):
            loss = step_loss(model, run.teacher, ids, config, None if run.topk is None else run.topk.batch(idx))
            acc.backward(loss)
            if acc.sync_gradients:
                norm, bad = _grad_norm(model, config)
                if config.optim.grad_clip > 0:
                    acc.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
        loss_sum += loss.item()
        tokens += ids.numel() * world
    if world > 1:  # the step's loss is the mean over every process's micro-batches
        loss_sum = acc.reduce(torch.tensor([loss_sum], device=acc.device), reduction="mean").item()
    run.sched.step()
    ts.step += 1
    dt = time.perf_counter() - t0
    row = {"step": ts.step, "loss": loss_sum / config.optim.grad_accum, "lr": run.sched.get_last_lr()[0],
           "tau": tau_at(config, ts.step - 1), "step_s": dt, "tokens_per_s": tokens / dt,
           "peak_mem_bytes": _peak_mem(), "centroid_drift": centroid_drift(acc.unwrap_model(model)),
           "grad_norm": norm, "rollbacks": ts.rollbacks}
    return row, norm, bad


def evaluate(model: torch.nn.Module, heldout: torch.Tensor, acc: Any) -> float:
    """Held-out perplexity of ``model`` (eval mode: hard LUT weights); inf when the mean
    loss is too large for ``exp``."""
    return heldout_scores(model, None, heldout, acc, with_kl=False)[0]


def heldout_scores(model: torch.nn.Module, teacher: torch.nn.Module | None, heldout: torch.Tensor, acc: Any,
                   with_kl: bool, teacher_logits: torch.Tensor | None = None) -> tuple[float, float | None, Any]:
    """Held-out perplexity of ``model`` and, with ``with_kl``, its mean per-token
    KL(teacher || model) on the same predictions (one pass of each model; eval mode;
    the teacher's stored ``teacher_logits`` on ``heldout`` instead of ``teacher`` if given).

    Returns:
        ``(ppl, kl, fidelity)``: ``kl`` None without ``with_kl``; ``ppl`` inf when the mean
        loss is too large for ``exp``; ``fidelity`` the whole `edkm.evaluate.Fidelity` of
        the KL pass (top-1 agreement too: the final report reuses it), else None.
    """
    from edkm.evaluate import fidelity, perplexity

    try:
        with acc.autocast():
            if not with_kl:
                return perplexity(model, heldout.to(acc.device), batch_size=4), None, None
            f = fidelity(model, None if teacher_logits is not None else teacher, heldout.to(acc.device), batch_size=4,
                         cached_teacher_logits=teacher_logits)
    except OverflowError:
        log.warning("held-out perplexity overflows (mean loss > 709): reported as inf")
        return float("inf"), float("inf") if with_kl else None, None
    return f.perplexity, f.kl, f


def heldout_score(config: TrainConfig, ppl: float, kl: float | None) -> float:
    """A checkpoint's score of kind ``config.score_by`` from its held-out perplexity and KL
    (`heldout_scores`): the perplexity, the KL, or for ``loss`` the held-out training
    objective (KL for ``kd``, log perplexity for ``ce``, KL + ``optim.ce_weight`` x log
    perplexity for ``kd+ce``). Lower is better; inf stays inf."""
    by, loss = config.score_by, config.optim.loss
    if by == "ppl":
        return ppl
    if by == "kl" or loss == "kd":
        return kl
    nll = math.log(ppl)
    return nll if loss == "ce" else kl + config.optim.ce_weight * nll


def export_model(model: torch.nn.Module, path: Path) -> dict[str, int]:
    """`edkm.finalize` the model and write the packed export to ``path``.

    Returns:
        Sizes in bytes (see `edkm.export.export_compressed`).
    """
    finalize(model)
    return export_compressed(model.cpu(), path)


def _grad_norm(model: torch.nn.Module, config: TrainConfig) -> tuple[float | None, str | None]:
    """Global L2 gradient norm before clipping and the first non-finite gradient's name."""
    if config.optim.mixed_precision == "fp16":
        return None, None
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return 0.0, None
    total = float(torch.nn.utils.get_total_norm([g for _, g in named]))  # FSDP2 shards (DTensors): the global norm
    return total, (None if math.isfinite(total) else first_bad_grad(named))


def _peak_mem() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
