"""Evaluation of causal LMs on token windows (perplexity)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
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
