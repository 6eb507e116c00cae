"""Knowledge distillation from the float model: per-token KL(teacher || student).

`distill_loss` is the objective: at every token position, the KL divergence from the
frozen float model's (the teacher's) next-token distribution to the clustered student's,
over the full vocabulary, both at temperature ``T``, times ``T**2`` (so gradient sizes do
not shrink as ``T`` grows, Hinton et al. 2015), averaged over the positions that count::

    p = softmax(teacher / T), q = softmax(student / T)
    loss = T**2 * mean over kept positions of sum_v p_v (log p_v - log q_v)

`topk_distill_loss` is the same with the teacher known only through its ``k`` largest
logits per position (`precompute_teacher_topk` stores them on disk, so the teacher need
not be resident while the student trains). Given also the teacher's log-normaliser per
position, every id outside the k is pooled into one "tail" outcome on both sides: the
loss is then the exact KL between those (k + 1)-outcome distributions, never above the
full KL and equal to it when k is the vocabulary size. Without it the teacher's top-k is
renormalised, which overstates how peaked the teacher is: on a flat teacher it stays
large (log(V / k)) even for a student equal to the teacher.

`DistillTrainerMixin` puts `distill_loss` into a Hugging Face ``Trainer``.

Limits: logits are upcast to float32 for the softmaxes, so a (B, L, V) float32 copy of
each side exists during the loss (800 MB for 8 x 512 x 49,152).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edkm._checks import check_number

logger = logging.getLogger(__name__)

__all__ = ["distill_loss", "topk_distill_loss", "per_token_kl", "DistillTrainerMixin"]


def _check_common(student_logits: Tensor, temperature: float, mask: Tensor | None) -> None:
    check_number("temperature", temperature)
    if student_logits.ndim < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last (vocabulary) dim, got shape {tuple(student_logits.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
                         f"{tuple(student_logits.shape[:-1])}")


def _reduce(kl: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """kl: (...) per-position KL. mean over kept positions, their sum, or 'none' (masked ones 0)."""
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        count = kl.numel() if mask is None else mask.sum()
        return kl.sum() / torch.as_tensor(count, dtype=kl.dtype, device=kl.device).clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def per_token_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) at every position, in float32 or wider.

    Args:
        student_logits: (..., V) logits of the model being trained.
        teacher_logits: (..., V) logits of the reference model, same shape.
        temperature: T > 0.

    Returns:
        (...) KL per position (not scaled by T**2), dtype float32 (float64 for float64 inputs).

    Raises:
        ValueError: shapes differ or T <= 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    _check_common(student_logits, temperature, None)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (..., V)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # (..., V)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Distillation loss: T**2 * KL(teacher || student) per token over the full vocabulary.

    The teacher side carries no gradient (it is detached).

    Args:
        student_logits: (..., V) logits of the student, e.g. (B, L, V) from a causal LM.
        teacher_logits: (..., V) logits of the teacher at the same positions.
        temperature: softmax temperature T > 0 of both sides; the KL is multiplied by T**2.
        mask: optional (...) bool / 0-1 tensor, True where a position counts (e.g. the
            ``attention_mask``); masked positions add nothing and do not count in the mean.
        reduction: "mean" (over kept positions), "sum", or "none" (per position, masked 0).

    Returns:
        A scalar (or (...) for "none") float32 tensor (float64 for float64 inputs).

    Raises:
        ValueError: shape mismatch, T <= 0, or an unknown reduction.
    """
    _check_common(student_logits, temperature, mask)
    kl = per_token_kl(student_logits, teacher_logits, temperature) * temperature**2
    return _reduce(kl, mask, reduction)


def topk_distill_loss(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    teacher_logsumexp: Tensor | None = None,
) -> Tensor:
    """`distill_loss` with the teacher given by its top-k logits per position.

    Student: full-vocabulary ``log_softmax(student_logits / T)`` gathered at the k ids.
    With ``teacher_logsumexp`` (``logsumexp(teacher_logits / T)`` over the full
    vocabulary): teacher ``p_i = exp(values_i / T - logsumexp)`` at the k ids and
    ``p_tail = 1 - sum p_i`` for all others together, student ``q_tail`` likewise; the loss
    per position is ``T**2 * (sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail))``,
    the KL of the pooled distributions (<= the full KL; equal when k = V). Without it the
    teacher is ``softmax(values / T)`` over the k ids (renormalised) and the tail term is
    dropped; that is >= 0 and 0 only when the student puts on the k ids exactly the
    teacher's renormalised mass.

    Args:
        student_logits: (..., V) student logits.
        teacher_values: (..., k) teacher logits at ``teacher_indices`` (any float dtype).
        teacher_indices: (..., k) distinct int vocabulary ids in [0, V) per position.
        temperature, mask, reduction: as `distill_loss`.
        teacher_logsumexp: optional (...) log-normaliser of the teacher's logits / T.

    Returns:
        As `distill_loss`.

    Raises:
        ValueError: shapes that do not match, ids out of range, T <= 0, or a bad reduction.
    """
    _check_common(student_logits, temperature, mask)
    if teacher_values.shape != teacher_indices.shape or teacher_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher values {tuple(teacher_values.shape)} and indices {tuple(teacher_indices.shape)} "
                         f"must both be (..., k) with ... = {tuple(student_logits.shape[:-1])}")
    if teacher_logsumexp is not None and teacher_logsumexp.shape != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logsumexp shape {tuple(teacher_logsumexp.shape)} must be the logits' leading "
                         f"shape {tuple(student_logits.shape[:-1])}")
    vocab = student_logits.shape[-1]
    idx = teacher_indices.to(device=student_logits.device, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
        raise ValueError(f"teacher ids must be in [0, {vocab}), got [{int(idx.min())}, {int(idx.max())}]")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    scaled = student_logits.to(dtype) / temperature
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_q = scaled.gather(-1, idx) - log_z  # (..., k)
    teacher = teacher_values.detach().to(device=log_q.device, dtype=dtype) / temperature
    if teacher_logsumexp is None:
        log_p = F.log_softmax(teacher, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return _reduce(kl * temperature**2, mask, reduction)
    log_p = teacher - teacher_logsumexp.detach().to(device=log_q.device, dtype=dtype).unsqueeze(-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    if idx.shape[-1] < vocab:  # k = V leaves no tail (and its logsumexp would be over nothing)
        p_tail = (1 - p.sum(-1)).clamp_min(0)  # fp16-stored values can overshoot by rounding
        log_q_tail = torch.logsumexp(scaled.scatter(-1, idx, float("-inf")), dim=-1) - log_z[..., 0]
        kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return _reduce(kl * temperature**2, mask, reduction)


class DistillTrainerMixin:
    """Mix into a Hugging Face ``Trainer`` to train on `distill_loss` from a frozen teacher.

    Usage::

        from transformers import Trainer
        class DistillTrainer(edkm.DistillTrainerMixin, Trainer):
            pass
        trainer = DistillTrainer(model=student, args=..., train_dataset=...,
                                 teacher=teacher, distill_temperature=1.0, ce_weight=0.0)

    ``compute_loss`` runs the teacher under ``torch.no_grad`` on the same ``input_ids`` /
    ``attention_mask``, and returns ``distill_loss(student, teacher, T, mask=attention_mask)``
    plus ``ce_weight`` times the student's own LM loss when ``labels`` are in the batch.
    The teacher is moved to the student's device once and kept in eval mode.

    Args (keyword, consumed before ``Trainer.__init__``):
        teacher: the frozen float model (a causal LM returning ``.logits``).
        distill_temperature: T of `distill_loss` (default 1.0).
        ce_weight: weight of the cross-entropy term (default 0.0: pure distillation).
    """

    # Our loss is a per-batch mean, so the Trainer must divide it by the gradient-accumulation steps
    # (transformers >= 5.2x reads this attribute; older ones decide from model_accepts_loss_kwargs, set below).
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, teacher: nn.Module, distill_temperature: float = 1.0,
                 ce_weight: float = 0.0, **kwargs: Any) -> None:
        check_number("distill_temperature", distill_temperature)
        check_number("ce_weight", ce_weight, inclusive=True)  # NaN here would train on NaN without an error
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher.eval().requires_grad_(False)
        self.distill_temperature = float(distill_temperature)
        self.ce_weight = float(ce_weight)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The ``Trainer`` hook: distillation loss (+ ``ce_weight`` x LM loss) for one batch."""
        labels = inputs.get("labels") if self.ce_weight > 0 else None
        student_inputs = {k: v for k, v in inputs.items() if k != "labels" or labels is not None}
        outputs = model(**student_inputs)
        device = outputs.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                          attention_mask=inputs.get("attention_mask")).logits
        mask = inputs.get("attention_mask")
        loss = distill_loss(outputs.logits, teacher_logits, self.distill_temperature,
                            mask=None if mask is None else mask.bool())
        if labels is not None:
            loss = loss + self.ce_weight * outputs.loss
        return (loss, outputs) if return_outputs else loss
