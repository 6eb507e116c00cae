"""The training windows of ``data.source``: the corpus, text sampled from the float model, or both.

    corpus   the corpus windows as `edkm.train.data.load_model_and_windows` cut them
    teacher  ``data.teacher_windows`` windows sampled from the float model itself
             (data-free distillation, `edkm.hub.teacher_text.sample_teacher_windows`)
    mix      those teacher windows plus as many corpus windows (a seeded choice spread
             over the corpus), so half of the data is each; the data order mixes them

Teacher windows are sampled once, before clustering, on the run's device, and cached on
disk (``data.teacher_cache_dir``, default edkm's cache) keyed by the model's fingerprint and
every sampling setting: a second run or a ``--resume`` reads them back. Sampling starts each
window after the tokenizer's BOS (when it has one) from a start token that is not a special
token; 3 greedy tokens, then sampling at temperature 1 over the full vocabulary (LLM-QAT's
recipe). The held-out split of the corpus is never replaced: it stays what the run scores.

Limits: with several processes every rank samples (the same windows; shard writes are
atomic), which repeats the work on each rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from edkm.hub.teacher_text import sample_teacher_windows
from edkm.hub.text import TokenWindows
from edkm.train.config import TrainConfig

log = logging.getLogger(__name__)

def training_windows(config: TrainConfig, model: torch.nn.Module, tokenizer: Any, windows: TokenWindows,
                     device: torch.device | None = None, progress: bool = False) -> TokenWindows:
    """The windows the run trains on, for ``config.data.source``.

    Args:
        config: The run's config (``data.source``, ``data.teacher_windows``,
            ``data.teacher_cache_dir``, ``data.seq_len``, ``run.seed``).
        model: The float model (the teacher), before `edkm.prepare`.
        tokenizer: Its tokenizer (BOS and special ids for the sampler).
        windows: The corpus windows (train and held-out).
        device: Where to sample (None: where the model is). The model is left there.
        progress: Show the sampler's tqdm bar.
    Returns:
        `TokenWindows` whose ``train`` is the corpus, teacher or mixed windows and whose
        ``heldout`` is the corpus's held-out split, unchanged.
    """
    d = config.data
    if d.source == "corpus":
        return windows
    teacher = sample_from_teacher(model, tokenizer, d.teacher_windows, config, device, progress)
    if d.source == "teacher":
        train = teacher
    else:  # mix: as many corpus windows as teacher windows, spread over the corpus by the seed
        n = min(teacher.shape[0], windows.train.shape[0])
        pick = torch.randperm(windows.train.shape[0], generator=torch.Generator().manual_seed(config.run.seed + 1))
        train = torch.cat([windows.train[pick[:n].sort().values], teacher])
    log.info("data.source=%s: %d training windows (%d tokens), %d of them sampled from the float model",
             d.source, train.shape[0], train.numel(), teacher.shape[0])
    return TokenWindows(train=train, heldout=windows.heldout)


def sample_from_teacher(model: torch.nn.Module, tokenizer: Any, n_windows: int, config: TrainConfig,
                        device: torch.device | None = None, progress: bool = False) -> torch.Tensor:
    """``n_windows`` windows sampled from ``model`` with the run's settings (cached, resumable).

    Args:
        model: The float model. tokenizer: Its tokenizer.
        n_windows: How many windows.
        config: The run's config: ``data.seq_len`` tokens per window, ``data.teacher_batch``
            windows per batch, ``data.teacher_temperature`` / ``teacher_top_k``,
            ``data.teacher_cache_dir``, seed ``run.seed``.
        device: Where to sample. progress: Show a tqdm bar.
    Returns:
        (n_windows, seq_len) int64 token ids on the CPU.
    """
    if device is not None:
        model.to(device)
    d = config.data
    bos = getattr(tokenizer, "bos_token_id", None)
    special = [int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])]
    return sample_teacher_windows(model, n_windows, d.seq_len, batch_size=min(d.teacher_batch, n_windows),
                                  temperature=float(d.teacher_temperature), top_k=d.teacher_top_k or None,
                                  seed=config.run.seed, prefix_ids=[] if bos is None else [int(bos)],
                                  exclude_ids=special, cache_dir=d.teacher_cache_dir or None, progress=progress)
