"""Uniform-quantisation peers of the accuracy bench (HQQ, GPTQ) and honest bits-per-weight accounting.

Peers, each applied in place to exactly the named decoder linears, leaving plain
``nn.Linear`` layers whose weights hold the dequantised values (so every row is scored by
the same float forward):

- `hqq_`: HQQ (pip ``hqq``, ``hqq.core.quantize.HQQLinear``), calibration-free half-quadratic
  optimisation of a zero and scale per group of ``group_size`` consecutive weights of the
  row-major weight (``axis=1``, HQQ's default; a group may span two rows when it does not
  divide the row), HQQ's other defaults (4-bit: rounded zeros).
- `gptq_`: GPTQ through llmcompressor (pip ``llmcompressor``, ``GPTQModifier`` in
  ``oneshot``): symmetric integer weights, one scale per ``group_size`` input columns of a
  row (it must divide every layer's input width: on SmolLM2, 576 = 4.5 x 128, so group 128 is
an error row), calibrated on the token windows given (the bench passes the same windows that
  calibrate edkm's Fisher init), dampening 0.01, block 128, sequential pipeline.

Bits per weight (`bits_per_weight`) count every stored bit of the quantised layers: codes
packed densely at ``bits`` bits each (as edkm's export packs them; HQQ's own 3-bit packing
stores 10 codes per int32, i.e. 3.2 bits, which is not charged here), plus LUTs, scales and
zeros at 16 bits each. Examples for a 576 x 576 layer at 4 bits: one 16-entry LUT per 16 rows
4.028; HQQ group 64 (fp16 scale + zero) 4.5, group 128: 4.25; GPTQ group 64 (fp16 scale,
symmetric) 4.25.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["Storage", "bits_per_weight", "lut_storage", "row_range_storage", "model_lut_storage", "count_group_violations",
           "hqq_", "gptq_"]

SIDE_BITS = 16  # LUT entries, scales and zeros are stored as fp16


@dataclass(frozen=True)
class Storage:
    """What one quantised layer stores.

    Attributes:
        numel: weights in the layer.
        code_bits: bits per code; codes are packed densely, rounded up to whole bytes per layer.
        side_bits: all other stored bits of the layer (LUTs, scales, zeros).
        n_codes: codes stored (None: one per weight; numel / d for d-dimensional clusters).
    """

    numel: int
    code_bits: int
    side_bits: int
    n_codes: int | None = None


def bits_per_weight(layers: Iterable[Storage]) -> float:
    """Stored bits per weight: sum(ceil(n_codes * code_bits / 8) * 8 + side_bits) / sum(numel).

    Raises:
        ValueError: no layers, or no weights.
    """
    layers = list(layers)
    total = sum(s.numel for s in layers)
    if not layers or total == 0:
        raise ValueError(f"need at least one layer with weights, got {layers!r}")
    code = sum(8 * math.ceil((s.numel if s.n_codes is None else s.n_codes) * s.code_bits / 8) for s in layers)
    return (code + sum(s.side_bits for s in layers)) / total


def lut_storage(shape: tuple[int, int], bits: int, group_rows: int) -> Storage:
    """One LUT of 2**bits fp16 scalars per ``group_rows`` output rows (coremltools / edkm grouped LUTs)."""
    rows, cols = shape
    return Storage(rows * cols, bits, math.ceil(rows / group_rows) * 2**bits * SIDE_BITS)


def row_range_storage(shape: tuple[int, int], bits: int, group_rows: int) -> Storage:
    """A uniform grid per ``group_rows`` rows, stored as its fp16 minimum and step (the bench's rtn)."""
    rows, cols = shape
    return Storage(rows * cols, bits, math.ceil(rows / group_rows) * 2 * SIDE_BITS)


def model_lut_storage(model: nn.Module, names: list[str]) -> list[Storage]:
    """`Storage` of finalized edkm layers (`edkm.LUTLinear`: ``lut`` (G, K, d), ``indices``) by name.

    Raises:
        TypeError: a named layer holds no LUT.
    """
    out = []
    for name in names:
        m = model.get_submodule(name)
        if not hasattr(m, "lut"):
            raise TypeError(f"{name} is {type(m).__name__}, not a finalized LUT layer")
        groups, k, d = m.lut.shape
        rows, cols = m.weight_shape
        out.append(Storage(rows * cols, max(1, math.ceil(math.log2(k))), groups * k * d * SIDE_BITS,
                           n_codes=m.indices.numel()))
    return out


def count_group_violations(model: nn.Module, names: list[str], bits: int, group_size: int,
                           flat: bool = False) -> int:
    """Quantisation groups holding more than 2**bits distinct values (0: every group is quantised).

    Args:
        model, names: the quantised ``nn.Linear`` layers.
        bits: code width. group_size: weights per group.
        flat: groups are consecutive ``group_size`` weights of the row-major weight (HQQ's
            ``axis=1``); else ``group_size`` columns of each row, the last one possibly
            shorter (GPTQ's).

    Returns:
        The number of offending groups over all layers.
    """
    bad = 0
    for name in names:
        w = model.get_submodule(name).weight.detach()
        blocks = [w.reshape(-1, group_size)] if flat else list(w.split(group_size, dim=1))  # each (groups, width)
        for block in blocks:
            v = block.sort(1).values
            distinct = (v[:, 1:] != v[:, :-1]).sum(1) + 1  # (groups,)
            bad += int((distinct > 2**bits).sum())
    return bad


# ----------------------------------------------------------------------------- HQQ


def hqq_(model: nn.Module, names: list[str], bits: int, group_size: int) -> list[Storage]:
    """Quantise the named linears with HQQ in place (dequantised back into their float weights).

    Args:
        model: the model; ``names``: its ``nn.Linear`` layers to quantise.
        bits: 1..8 (HQQ's supported widths). group_size: weights per zero/scale (multiple of 8).

    Returns:
        The layers' `Storage` (codes, fp16 scale and zero per group).

    Raises:
        ImportError: ``hqq`` is not installed (names the pip package).
        ValueError: a group size that does not divide a layer's weights.
    """
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as e:
        raise ImportError(f"the hqq rows need the 'hqq' package: pip install -e .[peers] ({e})") from None
    storage = []
    for name in names:
        lin = model.get_submodule(name)
        if lin.weight.numel() % group_size:
            raise ValueError(f"group_size={group_size} does not divide {name}'s {lin.weight.numel()} weights")
        device = lin.weight.device
        hq = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1),
                       compute_dtype=torch.float32, device=str(device), del_orig=False)
        with torch.no_grad():
            lin.weight.copy_(hq.dequantize().reshape(lin.weight.shape).to(lin.weight.dtype))
        n_groups = hq.meta["scale"].numel()
        storage.append(Storage(lin.weight.numel(), bits, n_groups * 2 * SIDE_BITS))
        del hq
    return storage


# ----------------------------------------------------------------------------- GPTQ


def gptq_(model: nn.Module, names: list[str], bits: int, group_size: int, calib: Tensor,
          dampening: float = 0.01) -> list[Storage]:
    """Quantise the named linears with llmcompressor's GPTQ in place (plain float weights afterwards).

    GPTQ runs on a copy of the model (llmcompressor attaches its own parameters and hooks);
    only the quantised weights are copied back, so ``model`` stays a plain model.

    Args:
        model: a Hugging Face causal LM. names: its ``nn.Linear`` layers to quantise.
        bits: code width. group_size: input columns per scale.
        calib: (n, L) int64 calibration windows, one sample each.
        dampening: GPTQ's Hessian dampening fraction.

    Returns:
        The layers' `Storage` (codes, one fp16 scale per group; symmetric: no zeros).

    Raises:
        ImportError: ``llmcompressor`` is not installed (names the pip package).
        RuntimeError: GPTQ left a named layer unquantised.
    """
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError as e:
        raise ImportError(f"the gptq rows need the 'llmcompressor' package: pip install -e .[peers] ({e})") from None
    import copy

    for n in names:  # compressed-tensors' group quantisation has no ragged last group
        cols = model.get_submodule(n).weight.shape[1]
        if cols % group_size:
            raise ValueError(f"GPTQ group_size={group_size} does not divide {n}'s {cols} input columns "
                             f"(llmcompressor needs columns % group_size == 0)")
    try:
        from loguru import logger as loguru_logger

        loguru_logger.disable("llmcompressor")  # one INFO line per layer otherwise
    except ImportError:
        pass
    work = copy.deepcopy(model)
    scheme = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
    recipe = GPTQModifier(config_groups={"edkm_bench": {"targets": [f"re:^{re.escape(n)}$" for n in names],
                                                        "weights": scheme}},
                          block_size=128, dampening_frac=dampening)
    loader = torch.utils.data.DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib],
                                         batch_size=1)
    from llmcompressor.core import active_session

    active_session().reset()  # a failed earlier oneshot leaves its state behind
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # llmcompressor re-reads the model's config from disk (config.name_or_path)
            work.config.save_pretrained(tmp)
            work.config._name_or_path = tmp
            oneshot(model=work, dataset=loader, recipe=recipe, processor=object(),
                    num_calibration_samples=len(calib), max_seq_length=calib.shape[1],
                    shuffle_calibration_samples=False, pipeline="sequential")
    finally:
        active_session().reset()
    storage = []
    with torch.no_grad():
        for name in names:
            src = work.get_submodule(name)
            scale = getattr(src, "weight_scale", None)
            if scale is None:
                raise RuntimeError(f"llmcompressor GPTQ left {name} unquantised")
            model.get_submodule(name).weight.copy_(src.weight.to(model.get_submodule(name).weight.dtype))
            storage.append(Storage(src.weight.numel(), bits, scale.numel() * SIDE_BITS))
    del work
    return storage
