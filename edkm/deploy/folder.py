"""A ``save_pretrained``-style folder around an edkm export, and loading for generation.

Folder layout (what `save_folder` writes)::

    config.json               the model's LlamaConfig (HF ``save_pretrained``)
    generation_config.json    when the model has one
    model.edkm.safetensors    `edkm.export_compressed` output (packed codes + LUTs)
    tokenizer files           HF ``tokenizer.save_pretrained`` output, or
    edkm_tokenizer.json       ``{"kind": "bytes"}`` for edkm's `ByteTokenizer`

`edkm.load_compressed(folder)` reads the weights file of such a folder; `load_folder`
also returns the tokenizer. The config in ``config.json`` is informative (HF tools read
it); the model is rebuilt from the config stored inside the safetensors metadata, so
the two cannot disagree.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.export import FOLDER_WEIGHTS, export_compressed, load_compressed

log = logging.getLogger(__name__)

BYTE_TOKENIZER_FILE = "edkm_tokenizer.json"


def save_folder(model: nn.Module, tokenizer: Any, path: str | Path, **export_kwargs: Any) -> dict[str, int]:
    """Write ``model`` (finalized) and ``tokenizer`` as a folder that `load_folder` reads.

    Args:
        model: A finalized ``LlamaForCausalLM`` (LUT layers).
        tokenizer: An HF tokenizer (``save_pretrained``) or edkm's `ByteTokenizer`.
        path: Output directory (created; existing files of the same names are replaced).
        export_kwargs: Passed to `edkm.export_compressed` (``lut_dtype``, ``dense_dtype``).
    Returns:
        `edkm.export_compressed`'s sizes.
    Raises:
        ValueError: a tokenizer that can be neither saved nor recognised.
    """
    from edkm.hub.tokenizer import ByteTokenizer

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"folder path {str(out)!r} exists and is not a directory")
    if not isinstance(tokenizer, ByteTokenizer) and not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"cannot save tokenizer of type {type(tokenizer).__name__}: need an HF tokenizer "
                         "(save_pretrained) or edkm.hub.tokenizer.ByteTokenizer")
    out.mkdir(parents=True, exist_ok=True)
    sizes = export_compressed(model, out / FOLDER_WEIGHTS, **export_kwargs)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if isinstance(tokenizer, ByteTokenizer):
        (out / BYTE_TOKENIZER_FILE).write_text(json.dumps({"kind": "bytes"}))
    else:
        tokenizer.save_pretrained(out)
    log.info("wrote %s (%d bytes of weights)", out, sizes["file"])
    return sizes


def load_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load a `save_folder` folder: ``(model, tokenizer)``.

    Args:
        path: The folder. dtype: Compute dtype of the model.
    Returns:
        The ``LlamaForCausalLM`` (eval mode, LUT layers) and its tokenizer.
    Raises:
        FileNotFoundError: not a folder, no weights file, or no tokenizer in it.
    """
    p = Path(path)
    if not (p / FOLDER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{str(p)!r} is not an edkm folder (no {FOLDER_WEIGHTS}); write one with "
                                "edkm.deploy.folder.save_folder or `edkm export --format folder`")
    return load_compressed(p, dtype=dtype), load_tokenizer(p)


def load_tokenizer(source: str | Path) -> Any:
    """A tokenizer from an edkm folder, an HF tokenizer directory, ``"bytes"`` or ``"smollm2"``.

    Args:
        source: Where the tokenizer comes from.
    Returns:
        The tokenizer. Raises ``FileNotFoundError`` when the source holds none.
    """
    from edkm.hub.tokenizer import ByteTokenizer

    if str(source) == "bytes":
        return ByteTokenizer()
    if str(source) == "smollm2":
        from edkm.hub.models import load_smollm2

        return load_smollm2().tokenizer
    p = Path(source)
    if (p / BYTE_TOKENIZER_FILE).is_file():
        kind = json.loads((p / BYTE_TOKENIZER_FILE).read_text()).get("kind")
        if kind != "bytes":
            raise ValueError(f"{p / BYTE_TOKENIZER_FILE}: unknown tokenizer kind {kind!r}")
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"no tokenizer in {str(p)!r} (pass 'bytes', 'smollm2' or an HF tokenizer "
                                f"directory): {err}") from err


def load_for_generation(model: str | Path, tokenizer: str | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Model and tokenizer from an edkm folder or an ``.edkm.safetensors`` file.

    Args:
        model: A `save_folder` folder, or an export file.
        tokenizer: Tokenizer source for `load_tokenizer`; None: the folder's own, or for a
            bare file ``"bytes"`` when the vocabulary has 256 entries, else ``"smollm2"``.
        dtype: Compute dtype.
    Returns:
        ``(model, tokenizer)``.
    """
    p = Path(model)
    if p.is_dir():
        m = load_compressed(p, dtype=dtype)
        return m, load_tokenizer(tokenizer or p)
    m = load_compressed(p, dtype=dtype)
    return m, load_tokenizer(tokenizer or ("bytes" if m.config.vocab_size == 256 else "smollm2"))
