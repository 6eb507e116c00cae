"""Write a finalized model in one of the deployment formats (what ``edkm export --format`` calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

FORMATS = ("folder", "coreml")


def write_format(model: nn.Module, tokenizer: Any, fmt: str, out: str | Path, prefill_len: int = 64,
                 context: int = 512) -> str:
    """Write ``model`` as ``fmt`` and describe the result in one line.

    Args:
        model: A finalized ``LlamaForCausalLM`` (or one from `edkm.load_compressed`).
        tokenizer: Saved with ``"folder"``; unused by ``"coreml"``.
        fmt: ``"folder"`` (`edkm.deploy.folder.save_folder`) or ``"coreml"`` (`edkm.export_coreml`).
        out: Output directory / ``.mlpackage``.
        prefill_len, context: Core ML prefill length and KV-cache length.
    Returns:
        A summary line for the CLI.
    """
    if fmt == "coreml":
        from edkm.deploy.coreml import coreml_summary, export_coreml

        return coreml_summary(export_coreml(model, out, prefill_len, context))
    if fmt == "folder":
        from edkm.deploy.folder import save_folder

        sizes = save_folder(model, tokenizer, out)
        mib = {k: v / 2**20 for k, v in sizes.items()}
        return f"wrote folder {out}: weights {mib['file']:.2f} MiB (fp16 model {mib['fp16']:.2f} MiB)"
    raise ValueError(f"unknown deployment format {fmt!r}; choose from {FORMATS}")
