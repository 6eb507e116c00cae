"""Model-level API: `prepare` a model for clustered training, `finalize` it to LUTs.

`prepare` registers a `DKMWeight` parametrization on every selected ``nn.Linear`` (and,
with ``include_embeddings``, ``nn.Embedding`` and the LM head); `finalize` replaces each
of those modules by a `LUTLinear` / `LUTEmbedding` whose weight is the hard
nearest-centroid assignment. Tied weights (an LM head sharing the embedding matrix) get
one shared parametrization, so they stay tied and are clustered once.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from edkm.config import TAU_MIN, DKMConfig
from edkm.distributed import guard_hook
from edkm.functional import assign_codes
from edkm.layers import DKMWeight, LUTEmbedding, LUTLinear, clustered_layers

log = logging.getLogger(__name__)


def prepare(model: nn.Module, config: DKMConfig, importance: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Make every selected layer of ``model`` train through DKM (in place).

    Args:
        model: Any module; ``nn.Linear`` (and with ``config.include_embeddings``
            ``nn.Embedding``) submodules whose names match the config are clustered.
        config: Clustering settings (each layer's from `DKMConfig.for_layer`, so
            ``config.layers`` can give some layers other bits or LUT groups).
        importance: Optional ``{module name: (out, in) sensitivity}`` (for instance
            `edkm.fisher_importance`): the k-means init and the DKM centroid updates of
            those layers are weighted by it (sensitivity-aware clustering, see
            `edkm.layers.DKMWeight`). Layers missing from the mapping are unweighted; a
            key that names no layer prepare clusters is an error.
    A ``config.layers`` pattern that applies to no layer prepare clusters (it matches none, or
    only layers an earlier pattern claims) is an error too, raised before anything changes (a
    typo would otherwise leave those layers at the top-level settings).
    With ``config.tau_mode="gap"`` each layer's tau is then scaled by its centroid
    spacing relative to the others (`set_gap_taus`).

    Returns:
        The same model. Raises ``ValueError`` if nothing was selected or a layer's
        shape does not fit the config (the message names the layer).
    """
    by_weight: dict[int, DKMWeight] = {}
    used: set[str] = set()
    layers = selected_layers(model, config)
    names = [name for name, _ in layers]
    if names:  # checked before any k-means init runs or any parametrization is registered
        check_layer_patterns(config, names)
    for name, module in layers:
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"layer {name!r} is already parametrized; prepare() was called twice?")
        weight = module.weight
        if weight.is_meta:
            raise ValueError(f"layer {name!r} has its weight on the meta device (shape {tuple(weight.shape)}, no "
                             "values): load the model with real weights (not device_map='meta' / init_empty_weights) "
                             "before prepare()")
        param = by_weight.get(id(weight))
        if param is None:
            try:
                imp = None if importance is None else importance.get(name)
                if imp is not None:
                    used.add(name)
                param = DKMWeight(weight, config.for_layer(name), imp)
            except ValueError as err:
                raise ValueError(f"cannot cluster layer {name!r}: {err}") from err
            by_weight[id(weight)] = param
        parametrize.register_parametrization(module, "weight", param, unsafe=True)
    if not layers:
        kinds = (nn.Linear, nn.Embedding) if config.include_embeddings else (nn.Linear,)
        small = [(n, m.weight.numel()) for n, m in model.named_modules() if isinstance(m, kinds) and config.selects(n)]
        if small:
            name, numel = max(small, key=lambda x: x[1])
            raise ValueError(f"no layer matched with enough weights: all {len(small)} layer(s) matching "
                             f"include={config.include} exclude={config.exclude} have fewer than min_weight_numel="
                             f"{config.min_weight_numel} weights (largest: {name!r} with {numel}); lower "
                             "dkm.min_weight_numel")
        raise ValueError(f"no layer matched include={config.include} exclude={config.exclude}")
    unused = sorted(set(importance or {}) - used)
    if unused:
        raise ValueError(f"importance given for {len(unused)} layer(s) that prepare() did not cluster first "
                         f"(unselected, too small, or a later alias of a tied weight), e.g. {unused[:3]}")
    if config.tau_mode == "gap":
        set_gap_taus(list(by_weight.values()), config)
    model.register_forward_pre_hook(guard_hook)  # refuses FSDP2 misuse at the first forward
    shapes = Counter(f"{p.config.bits}-bit {p.config.granularity}"
                     + (f" {p.config.group_size} rows" if p.config.granularity == "per_grouped_channel" else "")
                     for p in by_weight.values())
    log.info("prepared %d layers for DKM: %s", len(layers), ", ".join(f"{n} x {k}" for k, n in shapes.items()))
    return model


def set_gap_taus(params: list[DKMWeight], config: DKMConfig) -> None:
    """``tau_mode="gap"``: scale each layer's tau by its centroid spacing over the median
    spacing of ``params`` (`DKMWeight.spacing`, upper median). A layer whose centroids all
    coincide keeps the plain tau; no layer's tau goes below `edkm.config.TAU_MIN`."""
    spacings = [p.spacing() for p in params]
    positive = sorted(g for g in spacings if g > 0)
    if not positive:
        return
    ref = positive[len(positive) // 2]
    for p, g in zip(params, spacings):
        p.set_tau_scale(max(g / ref, TAU_MIN / config.tau) if g > 0 else 1.0)
    taus = sorted(p.tau for p in params)
    log.info("tau_mode gap: per-layer tau min %.3g, median %.3g, max %.3g over %d layers",
             taus[0], taus[len(taus) // 2], taus[-1], len(taus))


def check_layer_patterns(config: DKMConfig, names: list[str]) -> None:
    """Raise ValueError naming each ``config.layers`` pattern that applies to none of
    ``names``: it matches none of them, or only layers an earlier pattern claims first."""
    patterns = [p for p, _ in config.layers]
    claimed = {config.layer_pattern(n) for n in names}
    idle = [p for p in patterns if p not in claimed]
    if not idle:
        return
    shadowed = [p for p in idle if any(fnmatch.fnmatchcase(n, p) for n in names)]
    why = f"; {shadowed} only match layers an earlier pattern claims (the first match wins)" if shadowed else ""
    raise ValueError(f"dkm layers pattern(s) {idle} apply to no layer prepare() clusters ({len(names)} layers, "
                     f"e.g. {names[:3]}){why}; patterns are fnmatch globs over module names such as '*.v_proj'")


def selected_layers(model: nn.Module, config: DKMConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers `prepare` clusters: ``nn.Linear`` (and with
    ``config.include_embeddings`` ``nn.Embedding``) whose names the config selects and
    which hold at least ``config.min_weight_numel`` weights, in ``named_modules`` order."""
    kinds = (nn.Linear, nn.Embedding) if config.include_embeddings else (nn.Linear,)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or not config.selects(name):
            continue
        if module.weight.numel() < config.min_weight_numel:
            log.debug("skip %s: %d weights < min_weight_numel=%d", name, module.weight.numel(), config.min_weight_numel)
            continue
        out.append((name, module))
    return out


def centroid_drift(model: nn.Module) -> float:
    """Mean over layers of the largest centroid move at the last training step."""
    drifts = [p.drift.item() for _, _, p in clustered_layers(model)]
    return sum(drifts) / len(drifts) if drifts else 0.0


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Replace clustered layers by LUT layers (hard nearest-centroid weights), in place.

    Returns:
        The same model; each clustered layer becomes `LUTLinear` / `LUTEmbedding` with a
        LUT in the weight's dtype and uint8 indices.
    """
    done: dict[int, nn.Module] = {}
    for name, module, param in list(clustered_layers(model)):
        original = module.parametrizations.weight.original
        key = id(param)
        if key not in done:
            points = param.points(original)
            codes = assign_codes(points, param.centroids, 8, backend=param.config.backend)  # uint8 (G, >= N)
            idx = codes[:, : points.shape[1]].reshape(original.shape[0], -1)
            lut = param.centroids.to(original.dtype)
            if isinstance(module, nn.Embedding):
                done[key] = LUTEmbedding(lut, idx, tuple(original.shape), module.padding_idx)
            else:
                bias = module.bias
                done[key] = LUTLinear(lut, idx, bias, tuple(original.shape))
        new = done[key]
        if isinstance(module, nn.Linear) and isinstance(new, LUTEmbedding):
            # LM head tied to the embedding: same LUT and indices, linear forward.
            new = LUTLinear(new.lut, new.indices, module.bias, tuple(original.shape))
            new.lut, new.indices = done[key].lut, done[key].indices
        _set_submodule(model, name, new)
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
