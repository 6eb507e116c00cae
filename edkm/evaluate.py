"""Evaluation of causal LMs on token windows: perplexity, and fidelity to a reference model.

`perplexity` scores one model. `fidelity` scores a compressed student against its float
teacher on the same windows and predictions: the student's perplexity (and the teacher's,
for the ratio), the mean per-token KL(teacher || student) over the full vocabulary, and
top-1 next-token agreement (the share of positions where both models' argmax agree).
Both materialise (batch, L, V) float32 logits per forward (800 MB for 8 x 512 x 49,152).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from edkm._checks import check_int

logger = logging.getLogger(__name__)


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of a causal LM over token windows: exp of the mean next-token NLL.

    Each window is scored on its own: tokens 1..L-1 given their prefix, so ``n * (L - 1)``
    predictions in all. The model runs under ``torch.no_grad`` in eval mode and is put back
    in its previous mode.

    Args:
        model: a Hugging Face causal LM (returns ``.logits``).
        windows: (n, L) int64 token ids, L >= 2.
        batch_size: windows per forward pass.

    Returns:
        exp(sum of NLL / number of predicted tokens), NLL summed in float64.

    Raises:
        ValueError: empty or non-2-D windows, L < 2, or batch_size < 1.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n >= 1, L >= 2), got shape {tuple(windows.shape)}")
    check_int("batch_size", batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)  # (B, L)
                logits = model(input_ids=batch, use_cache=False).logits  # (B, L, V)
                nll = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(),  # (B*(L-1), V); fp32 for bf16 models
                    batch[:, 1:].flatten(),
                    reduction="sum",
                )
                nll_sum += float(nll.double())
                n_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    ppl = math.exp(nll_sum / n_tokens)
    logger.info("perplexity %.3f over %d predicted tokens (%d windows)", ppl, n_tokens, windows.shape[0])
    return ppl


@dataclass(frozen=True)
class Fidelity:
    """How closely a student follows its teacher on some windows.

    Attributes:
        perplexity: the student's perplexity (as `perplexity` computes it).
        teacher_perplexity: the teacher's, on the same predictions.
        kl: mean per-token KL(teacher || student) in nats, full vocabulary, temperature 1.
        top1_agreement: share of positions where the student's argmax equals the teacher's.
        n_predictions: positions scored (n * (L - 1)).
    """

    perplexity: float
    teacher_perplexity: float
    kl: float
    top1_agreement: float
    n_predictions: int

    @property
    def ppl_ratio(self) -> float:
        """Student perplexity over teacher perplexity."""
        return self.perplexity / self.teacher_perplexity

    def to_dict(self) -> dict[str, float]:
        """The fields plus ``ppl_ratio``, for JSON rows."""
        return {**asdict(self), "ppl_ratio": self.ppl_ratio}


def teacher_logits(teacher: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """The teacher's float32 logits at positions 0..L-2 of every window, on the CPU, for reuse by `fidelity`.

    Args:
        teacher: a causal LM. windows: (n, L) int64 token ids, L >= 2. batch_size: windows per forward.

    Returns:
        (n, L - 1, V) float32 (n * (L - 1) * V * 4 bytes: 800 MB for 32 x 128 tokens of a 49k vocabulary).
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n >= 1, L >= 2), got shape {tuple(windows.shape)}")
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            return torch.cat([teacher(input_ids=b.to(device), use_cache=False).logits[:, :-1].float().cpu()
                              for b in windows.split(batch_size)])
    finally:
        teacher.train(was_training)


def fidelity(student: torch.nn.Module, teacher: torch.nn.Module | None, windows: torch.Tensor,
             batch_size: int = 4, *, cached_teacher_logits: torch.Tensor | None = None) -> Fidelity:
    """Perplexity, KL(teacher || student) per token and top-1 agreement of a student on windows.

    Every window is scored on its own at positions 0..L-2 (the predictions of tokens
    1..L-1), the same positions as `perplexity`. Both models run under ``torch.no_grad``
    in eval mode and are put back in their previous modes; the windows go to each model's
    own device.

    Args:
        student: the compressed causal LM (returns ``.logits``).
        teacher: the reference (float) model, same vocabulary (None when
            ``cached_teacher_logits`` is given).
        windows: (n, L) int64 token ids, L >= 2.
        batch_size: windows per forward pass.
        cached_teacher_logits: the teacher's `teacher_logits` on these windows, to score many
            students against one teacher without rerunning it.

    Returns:
        A `Fidelity`; sums are accumulated in float64.

    Raises:
        ValueError: bad windows or batch_size, models whose vocabularies differ, or cached
            logits of the wrong shape.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n >= 1, L >= 2), got shape {tuple(windows.shape)}")
    check_int("batch_size", batch_size)
    if teacher is None and cached_teacher_logits is None:
        raise ValueError("fidelity needs a teacher or cached_teacher_logits")
    if cached_teacher_logits is not None and cached_teacher_logits.shape[:2] != (windows.shape[0], windows.shape[1] - 1):
        raise ValueError(f"cached_teacher_logits {tuple(cached_teacher_logits.shape)} do not match windows "
                         f"{tuple(windows.shape)}: expected (n, L - 1, V)")
    modes = (student.training, None if teacher is None else teacher.training)
    student.eval()
    if teacher is not None:
        teacher.eval()
    s_dev = next(student.parameters()).device
    nll_s = nll_t = kl_sum = 0.0
    agree = n = 0
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size]  # (B, L)
                s = student(input_ids=batch.to(s_dev), use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
                if cached_teacher_logits is not None:
                    t = cached_teacher_logits[start : start + batch_size].to(s.device, torch.float32)
                else:
                    t_dev = next(teacher.parameters()).device
                    t = teacher(input_ids=batch.to(t_dev), use_cache=False).logits[:, :-1].float().to(s.device)
                if s.shape != t.shape:
                    raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ")
                target = batch[:, 1:].to(s.device)  # (B, L-1)
                log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)  # (B, L-1, V)
                nll_s -= float(log_q.gather(-1, target[..., None]).double().sum())
                nll_t -= float(log_p.gather(-1, target[..., None]).double().sum())
                kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).double().sum())
                agree += int((s.argmax(-1) == t.argmax(-1)).sum())
                n += target.numel()
    finally:
        student.train(modes[0])
        if teacher is not None:
            teacher.train(modes[1])
    out = Fidelity(perplexity=math.exp(nll_s / n), teacher_perplexity=math.exp(nll_t / n), kl=kl_sum / n,
                   top1_agreement=agree / n, n_predictions=n)
    logger.info("fidelity: ppl %.3f (teacher %.3f, x%.3f), KL %.4f nats/token, top-1 agreement %.3f over %d tokens",
                out.perplexity, out.teacher_perplexity, out.ppl_ratio, out.kl, out.top1_agreement, n)
    return out
