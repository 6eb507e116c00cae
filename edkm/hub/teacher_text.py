"""Text sampled from the float model itself, for data-free distillation (as LLM-QAT does).

`sample_teacher_windows` generates ``n_windows`` token windows of ``seq_len`` tokens from the
teacher, in batches, with a KV cache (one token per forward after the first). Each window
starts from one token drawn uniformly from the vocabulary (minus ``exclude_ids``, e.g. the
special tokens; optionally after ``prefix_ids`` such as BOS); the next ``greedy_tokens``
tokens are the teacher's argmax and the rest are sampled from ``softmax(logits / T)``
(optionally restricted to the top ``top_k``). LLM-QAT (Liu et al. 2023) found this mix of a
few deterministic tokens, then sampling, to give the most useful data.

Results are cached on disk under ``<cache_dir>/teacher-text-<key>``, key = hash of the
teacher's fingerprint and every setting; each batch is one shard (written atomically), so
an interrupted run resumes where it stopped, and a batch's tokens depend only on the seed
and the batch's index (not on what ran before). A tqdm bar shows when asked; the token
count goes to the log.

Limits: sampling runs on the teacher's device in its dtype; an EOS token does not end a
window (the teacher continues after it, as LLM-QAT's generator does).
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from edkm._checks import check_int, check_number
from edkm.hub.models import default_cache_dir
from edkm.hub.shards import model_fingerprint, open_cache, read_shard, settings_key, shard_path, write_shard

logger = logging.getLogger(__name__)

__all__ = ["sample_teacher_windows", "teacher_text_dir"]

FORMAT = 2  # 2: inverse-CDF sampling (1: torch.multinomial)


def _settings(teacher: nn.Module, n_windows: int, seq_len: int, batch_size: int, temperature: float,
              top_k: int | None, greedy_tokens: int, seed: int, prefix_ids: Sequence[int],
              exclude_ids: Sequence[int]) -> dict:
    return {"format": FORMAT, "kind": "teacher_text", "model": model_fingerprint(teacher), "n_windows": n_windows,
            "seq_len": seq_len, "batch_size": batch_size, "temperature": temperature, "top_k": top_k,
            "greedy_tokens": greedy_tokens, "seed": seed, "prefix_ids": list(prefix_ids),
            "exclude_ids": sorted(set(exclude_ids))}


def teacher_text_dir(cache_dir: str | Path | None, settings: dict) -> Path:
    """The cache directory of one set of settings: ``<cache_dir>/teacher-text-<16 hex>``.

    Args:
        cache_dir: root (None: `edkm.hub.models.default_cache_dir`).
        settings: the settings dict the sampler keys on.

    Returns:
        The directory path (not created).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"teacher-text-{settings_key(settings)}"


def _first_tokens(vocab: int, exclude: Sequence[int], n: int, gen: torch.Generator) -> Tensor:
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in exclude if 0 <= i < vocab]] = False
    pool = allowed.nonzero().squeeze(1)  # (n_allowed,)
    return pool[torch.randint(0, pool.numel(), (n,), generator=gen)]  # (n,)


def _next_token(logits: Tensor, greedy: bool, temperature: float, top_k: int | None,
                gen: torch.Generator) -> Tensor:
    """logits: (B, V) -> (B, 1) next ids.

    Sampling inverts each row's CDF at one uniform draw (float64 cumulative sums): the same
    distribution as ``torch.multinomial`` at a fraction of its cost on the CPU, where
    multinomial draws one exponential per vocabulary entry (a quarter of a decode step).
    """
    if greedy:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).double().cumsum(-1)  # (B, V)
    u = torch.rand(logits.shape[0], 1, generator=gen, device=logits.device, dtype=torch.float64)
    # The first entry whose cumulative mass exceeds u: entry i with probability p_i (zero-mass entries never).
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def _sample_batch(teacher: nn.Module, rows: int, settings: dict, batch_index: int, vocab: int) -> Tensor:
    device = next(teacher.parameters()).device
    # A batch's tokens depend on (seed, batch index) only, so a resumed run equals an uninterrupted one.
    cpu_gen = torch.Generator().manual_seed(settings["seed"] * 1_000_003 + batch_index)
    dev_gen = torch.Generator(device=device).manual_seed(settings["seed"] * 1_000_003 + batch_index)
    prefix = torch.tensor(settings["prefix_ids"], dtype=torch.long).expand(rows, -1)  # (B, P)
    first = _first_tokens(vocab, settings["exclude_ids"], rows, cpu_gen)[:, None]  # (B, 1)
    ids = torch.cat([prefix, first], 1).to(device)  # (B, P + 1)
    out = [ids]
    # transformers >= 5.2x names the KV cache argument and output ``cache`` (``past_key_values`` before).
    cache_arg = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
    past = None
    step_input = ids
    length = ids.shape[1]
    while length < settings["seq_len"] + prefix.shape[1]:
        res = teacher(input_ids=step_input, use_cache=True, **{cache_arg: past})
        past = res[cache_arg]
        greedy = length - prefix.shape[1] <= settings["greedy_tokens"]
        step_input = _next_token(res.logits[:, -1], greedy, settings["temperature"], settings["top_k"], dev_gen)
        out.append(step_input)
        length += 1
    return torch.cat(out, 1)[:, prefix.shape[1]:].cpu()  # (B, seq_len): the window, prefix dropped


def sample_teacher_windows(
    teacher: nn.Module,
    n_windows: int,
    seq_len: int,
    *,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy_tokens: int = 3,
    seed: int = 0,
    prefix_ids: Sequence[int] = (),
    exclude_ids: Sequence[int] = (),
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample token windows from the teacher (cached on disk, resumable).

    Args:
        teacher: a causal LM with a KV cache (``past_key_values``); run in eval mode, mode restored.
        n_windows: windows to return.
        seq_len: tokens per window (the first is the random start token).
        batch_size: windows generated together (the unit of caching and resumption).
        temperature: sampling temperature T > 0.
        top_k: sample among the top_k logits only (None: the full vocabulary).
        greedy_tokens: tokens after the start token taken greedily (argmax).
        seed: sampling seed.
        prefix_ids: tokens fed before the start token and not returned (e.g. ``[bos_token_id]``).
        exclude_ids: ids never drawn as the start token (e.g. the tokenizer's special ids).
        cache_dir: cache root (None: ``$EDKM_CACHE_DIR`` or ``~/.cache/edkm``).
        progress: show a tqdm progress bar over windows.

    Returns:
        (n_windows, seq_len) int64 token ids.

    Raises:
        ValueError: a bad size or setting (names the value).
    """
    for name, value in (("n_windows", n_windows), ("seq_len", seq_len), ("batch_size", batch_size)):
        check_int(name, value)
    check_number("temperature", temperature)
    if top_k is not None:
        check_int("top_k", top_k, also="or None")
    check_int("greedy_tokens", greedy_tokens, 0)
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    settings = _settings(teacher, n_windows, seq_len, batch_size, float(temperature), top_k, greedy_tokens,
                         seed, prefix_ids, exclude_ids)
    directory = open_cache(teacher_text_dir(cache_dir, settings), settings)
    n_batches = -(-n_windows // batch_size)
    sizes = [min(batch_size, n_windows - b * batch_size) for b in range(n_batches)]
    todo = [b for b in range(n_batches) if not shard_path(directory, b).is_file()]
    if todo:
        logger.info("teacher text: sampling %d of %d windows x %d tokens (%d batches) into %s",
                    sum(sizes[b] for b in todo), n_windows, seq_len, len(todo), directory)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_windows, initial=n_windows - sum(sizes[b] for b in todo), desc="teacher text",
                   unit="window")
    was_training = teacher.training
    teacher.eval()
    t0 = time.perf_counter()
    try:
        for b in todo:
            write_shard(directory, b, {"input_ids": _sample_batch(teacher, sizes[b], settings, b, vocab)})
            if bar is not None:
                bar.update(sizes[b])
    finally:
        teacher.train(was_training)
        if bar is not None:
            bar.close()
    windows = torch.cat([read_shard(directory, b)["input_ids"] for b in range(n_batches)])
    made = sum(sizes[b] for b in todo) * seq_len
    logger.info("teacher text: %d windows x %d tokens = %d tokens (%d sampled now in %.1f s, %d from cache) in %s",
                n_windows, seq_len, windows.numel(), made, time.perf_counter() - t0, windows.numel() - made, directory)
    return windows
