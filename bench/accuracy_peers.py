"""coremltools' palettizers as accuracy-benchmark peers: each clusters the decoder linears in place.

Uses coremltools 9.0, ``coremltools.optimize.torch.palettization``:

- `ct_post_training`: ``PostTrainingPalettizer.compress`` (k-means per LUT, no data).
- `ct_skm`: ``SKMPalettizer.compress`` (k-means weighted by Fisher sensitivity, SqueezeLLM).
- `ct_dkm_prepare` / `ct_dkm_finalize`: ``DKMPalettizer.prepare`` and ``finalize``; the
  bench's own loop (the one edkm's row uses) trains in between, calling ``step()``.

Each palettizes exactly the layers of `select_linears` (or the ``names`` given) (one ``module_name_configs`` entry
per layer, no global config: ``lm_head`` and the embeddings stay float), one LUT of 2**bits
entries per ``group_size`` output channels (``granularity="per_grouped_channel"``, channel
axis 0). Afterwards the model is a plain float model in its own dtype whose selected weights
hold the hard palettized values; coremltools' ``_COREML_*`` metadata buffers (for Core ML
export) are removed, so the state dict keys are the float model's.

Deviations from coremltools' defaults, all in DKM: ``weight_threshold=0`` (2048 skips small
layers), ``palett_epsilon=0`` (1e-4 may stop before ``kmeans_iters`` iterations),
``prune_threshold=0`` (1e-7 biases the distance to centroid 0): plain DKM, exactly
``kmeans_iters`` iterations per forward. Its memory options (``palett_max_mem``,
``palett_unique``, ``palett_dist``) need CUDA or a process group and stay off. SKM's Fisher
sensitivity sums squared per-*batch* gradients; ``batch_size=1`` is per-window (SqueezeLLM).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["select_linears", "ct_post_training", "ct_skm", "ct_dkm_prepare", "ct_dkm_finalize",
           "count_lut_violations"]


def select_linears(model: nn.Module) -> list[str]:
    """Names of the decoder ``nn.Linear`` layers: every ``nn.Linear`` except ``lm_head`` and embeddings."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head" and "embed_tokens" not in name]


def count_lut_violations(model: nn.Module, names: list[str], bits: int | Mapping[str, int], group_size: int) -> int:
    """Number of (layer, group) blocks whose weight holds more than ``2**bits`` distinct values.

    A group is ``group_size`` consecutive output channels (rows) of the layer's weight; a
    last group may be shorter. ``bits``: one width for every layer, or each layer's by name
    (mixed precision). 0 means every block of every named layer is palettized.
    """
    bad = 0
    for name in names:
        limit = 2 ** (bits[name] if isinstance(bits, Mapping) else bits)
        m = model.get_submodule(name)
        w = (m.dense_weight() if hasattr(m, "dense_weight") else m.weight).detach()  # edkm LUTLinear or Linear
        for start in range(0, w.shape[0], group_size):
            block = w[start:start + group_size].flatten().sort().values
            distinct = 1 + int((block[1:] != block[:-1]).sum()) if block.numel() else 0
            bad += distinct > limit
    return bad


def _check(model: nn.Module, group_size: int, names: list[str] | None) -> tuple[list[str], torch.dtype]:
    names = select_linears(model) if names is None else list(names)
    if not names:
        raise ValueError("model has no decoder nn.Linear layers to palettize")
    for n in names:
        out = model.get_submodule(n).out_features
        if group_size < 1 or out % group_size:  # coremltools would skip such a layer with a log line only
            raise ValueError(f"group_size={group_size} does not divide {n}.out_features={out}")
    return names, next(model.parameters()).dtype


def _per_layer(names: list[str], cfg: Any) -> dict[str, Any]:
    return {re.escape(n): cfg for n in names}  # keys are regexes (re.fullmatch)


def _lut(bits: int, group_size: int) -> dict[str, Any]:
    return {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": group_size}


def _run(method: str, fn: Callable[[Any], nn.Module]) -> nn.Module:
    """Call ``fn(coremltools.optimize.torch.palettization)`` with coremltools' INFO log lines muted."""
    try:
        import coremltools.optimize.torch.palettization as ctp  # its import sets its logger to INFO

        log = logging.getLogger("coremltools.optimize.torch")
        level = log.level
        log.setLevel(max(level, logging.WARNING))  # one "Progress" line per layer otherwise; warnings still show
        try:
            return fn(ctp)
        finally:
            log.setLevel(level)
    except Exception as e:  # ImportError, or anything inside coremltools
        raise RuntimeError(f"coremltools {method} failed: {type(e).__name__}: {e}") from e


def _plain(model: nn.Module, names: list[str], dtype: torch.dtype) -> nn.Module:
    """Drop what coremltools leaves behind (``_COREML_*`` metadata buffers, DKM's Identity observer)."""
    for m in model.modules():
        for key in [k for k in m._buffers if k.startswith("_COREML_")]:
            delattr(m, key)
    for n in names:
        if isinstance(getattr(model.get_submodule(n), "activation_post_process", None), nn.Identity):
            delattr(model.get_submodule(n), "activation_post_process")
    return model.to(dtype)


def _mem_available() -> int | None:
    """MemAvailable in bytes, None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return model(input_ids=batch, labels=batch).loss


def ct_post_training(model: nn.Module, bits: int, group_size: int, names: list[str] | None = None) -> nn.Module:
    """Palettize the decoder linears with coremltools' ``PostTrainingPalettizer`` (k-means, no data).

    Other options default (``enable_fast_kmeans_mode``: k-means of the weights rounded to 4
    decimals). ``names``: the layers (default `select_linears`). Returns the model, modified
    in place. Raises RuntimeError naming the method on failure.
    """
    names, dtype = _check(model, group_size, names)

    def go(ctp: Any) -> nn.Module:
        cfg = ctp.ModulePostTrainingPalettizerConfig(**_lut(bits, group_size))
        config = ctp.PostTrainingPalettizerConfig(module_name_configs=_per_layer(names, cfg))
        return ctp.PostTrainingPalettizer(model, config).compress(inplace=True)

    return _plain(_run("PostTrainingPalettizer", go), names, dtype)


def ct_skm(model: nn.Module, bits: int, group_size: int, calib: Tensor, batch_size: int = 4,
           names: list[str] | None = None) -> nn.Module:
    """Palettize the decoder linears with coremltools' ``SKMPalettizer`` (sensitivity-weighted k-means).

    Sensitivity: squared gradients of ``model(input_ids=b, labels=b).loss`` summed over all
    batches ``b`` of ``batch_size`` rows of ``calib`` ((n, L) int64 token windows); ``names`` as
    `ct_post_training`. Returns the
    model, modified in place, gradients cleared. Raises RuntimeError naming the method on failure.
    """
    names, dtype = _check(model, group_size, names)
    batches = list(calib.split(batch_size))
    for n in names:
        model.get_submodule(n).weight.requires_grad_(True)

    def go(ctp: Any) -> nn.Module:
        cfg = ctp.ModuleSKMPalettizerConfig(**_lut(bits, group_size))
        config = ctp.SKMPalettizerConfig(module_name_configs=_per_layer(names, cfg), calibration_nsamples=len(batches))
        return ctp.SKMPalettizer(model, config).compress(dataloader=batches, loss_fn=_lm_loss, inplace=True)

    try:
        return _plain(_run("SKMPalettizer", go), names, dtype)
    finally:
        model.zero_grad(set_to_none=True)


def ct_dkm_prepare(model: nn.Module, bits: int, group_size: int, tau: float = 1e-4, kmeans_iters: int = 3,
                   names: list[str] | None = None, options: dict[str, Any] | None = None) -> Any:
    """Put coremltools' ``DKMPalettizer`` (DKM from step 0) on the decoder linears; returns the palettizer.

    ``palett_tau=tau``, ``kmeans_max_iter=kmeans_iters``; the first forward runs
    coremltools' k-means++ init of every LUT. Train the model with any loop, calling
    ``palettizer.step()`` after each optimizer step, then `ct_dkm_finalize`. ``options``:
    more ``ModuleDKMPalettizerConfig`` fields (override the above). Raises RuntimeError
    naming the method on failure, and before starting when the estimated autograd state
    exceeds the available CPU memory.
    """
    names, dtype = _check(model, group_size, names)
    # Autograd keeps ~4 fp32 (weights x 2**bits) maps per DKM iteration (measured on SmolLM2:
    # 2.7 GB per decoder layer at 4 bits, 3 iterations); fail before the OOM killer does.
    need = 4 * kmeans_iters * 4 * 2**bits * sum(model.get_submodule(n).weight.numel() for n in names)
    have = _mem_available()
    if next(model.parameters()).device.type == "cpu" and have is not None and need > have:
        raise RuntimeError(f"coremltools DKMPalettizer needs ~{need / 2**30:.0f} GiB for its autograd state "
                           f"(4 fp32 maps of weights x 2**bits per iteration), {have / 2**30:.0f} GiB available")

    def go(ctp: Any) -> Any:
        cfg = ctp.ModuleDKMPalettizerConfig(**{
            **_lut(bits, group_size), "milestone": 0, "palett_tau": tau, "kmeans_max_iter": kmeans_iters,
            "weight_threshold": 0, "palett_epsilon": 0.0, "prune_threshold": 0.0, **(options or {})})
        pal = ctp.DKMPalettizer(model, ctp.DKMPalettizerConfig(module_name_configs=_per_layer(names, cfg)))
        prepared = pal.prepare(inplace=True)
        missing = [n for n in names if not hasattr(prepared.get_submodule(n), "weight_fake_quant")]
        if missing:
            raise RuntimeError(f"prepare() left {len(missing)} selected layers unpalettized, e.g. {missing[0]}")
        pal.edkm_names, pal.edkm_dtype = names, dtype  # for ct_dkm_finalize
        return pal

    return _run("DKMPalettizer", go)


def ct_dkm_finalize(model: nn.Module, palettizer: Any) -> nn.Module:
    """Finalize a `ct_dkm_prepare` model: every weight to its nearest centroid, plain ``nn.Linear`` layers.

    Returns the model (modified in place, training mode restored).
    """
    was_training = model.training

    def go(ctp: Any) -> nn.Module:
        return palettizer.finalize(model, inplace=True)

    out = _plain(_run("DKMPalettizer", go), palettizer.edkm_names, palettizer.edkm_dtype)
    return out.train(was_training)
