"""The DKM weight parametrization (training time).

`DKMWeight` is a `torch.nn.utils.parametrize` parametrization: the layer keeps its dense
weight as the trainable parameter (``parametrizations.weight.original``), and every
access to ``layer.weight`` returns the soft-clustered weight in training mode and the
hard nearest-centroid weight in eval mode. Centroids are a buffer, warm-started from the
previous step. `state_dict`, optimizers and `.to()` keep working as for any parametrized
module.

Eval-mode code cache: the nearest-centroid search is most of a prepared model's eval
forward (5x a float forward for SmolLM2 at 4 bits), and its answer does not change while
neither the weight nor the centroids do. So in eval mode each `DKMWeight` keeps the uint8
codes it found (1 byte per weight) and reuses them while the weight and the centroids are
the same tensors at the same version counters and on the same device; ``train()`` drops
them. Set ``cache_codes = False`` on a parametrization to search on every access instead.

Weight layout: a (out, in) weight with cluster_dim d is viewed as out * in / d points of
dimension d (consecutive input features form a vector). Per-tensor LUTs use one group;
``per_grouped_channel`` makes one group per ``group_size`` output channels:

    weight (out, in) -> points (G, out / G * in / d, d)      G = 1 or out / group_size
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edkm._checks import check_number
from edkm.config import DKMConfig
from edkm.functional import check_importance, dkm, kmeans_init
from edkm.functional.packing import nearest
from edkm.offload import offload_saved_tensors


def weight_groups(out_features: int, in_features: int, config: DKMConfig) -> int:
    """Number of LUT groups for a weight; raises ``ValueError`` on shapes that don't fit."""
    d = config.cluster_dim
    if in_features % d:
        raise ValueError(f"cluster_dim={d} does not divide the weight's {in_features} input features")
    if config.granularity == "per_tensor":
        return 1
    if out_features % config.group_size:
        raise ValueError(
            f"group_size={config.group_size} does not divide the weight's {out_features} output channels"
        )
    return out_features // config.group_size


def to_points(weight: Tensor, groups: int, d: int) -> Tensor:
    """(out, in) weight -> (G, out / G * in / d, d) points (a view when contiguous)."""
    return weight.reshape(groups, -1, d)


class DKMWeight(nn.Module):
    """Parametrization that soft-clusters a (out, in) weight with DKM.

    Args:
        weight: The initial weight; its k-means gives the step-0 centroids.
        config: The clustering settings.
        importance: Optional (out, in) non-negative sensitivity of every weight (e.g. a
            diagonal Fisher from `edkm.fisher_importance`). It weights the k-means init
            and every DKM centroid update, so centroids sit where errors cost the most
            loss. Kept as a bf16 buffer (2 bytes per weight), scaled to mean 1 per LUT
            group; a group whose importance is all zero is weighted uniformly. The buffer
            is not persistent (not in ``state_dict``): checkpoints stay loadable into a
            model prepared without importance, and the trainer recomputes it on resume.
    """

    def __init__(self, weight: Tensor, config: DKMConfig, importance: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"DKMWeight clusters 2-D weights, got shape {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf; cannot cluster it")
        self.config = config
        self.groups = weight_groups(weight.shape[0], weight.shape[1], config)
        points = self.points(weight.detach())
        if importance is not None:  # not in state_dict: rebuilt from data (trainer: on resume too)
            self.register_buffer("importance", self._group_importance(importance, weight.shape), persistent=False)
        imp = getattr(self, "importance", None)
        c0 = kmeans_init(points, config.n_clusters, iters=config.init_iters, seed=config.seed,
                         importance=None if imp is None else imp.float())
        self.register_buffer("centroids", c0.float())  # (G, K, d), warm start
        self.register_buffer("drift", torch.zeros(()))  # max centroid move at the last step
        # This layer's tau is config.tau * tau_scale (`edkm.prepare` sets it for tau_mode "gap").
        # Persistent, so a resume keeps the factor fixed at prepare; a Python copy avoids a
        # device sync per forward.
        self.register_buffer("tau_scale", torch.ones(()))
        self._tau_scale = 1.0
        self.cache_codes = True
        self._codes: tuple | None = None  # (weight, its version, centroids, their version, uint8 codes)

    @property
    def tau(self) -> float:
        """The softmax temperature this layer trains with: ``config.tau * tau_scale``."""
        return self.config.tau * self._tau_scale

    def set_tau_scale(self, scale: float) -> None:
        """Make this layer's tau ``config.tau * scale`` (``scale`` finite and > 0)."""
        scale = float(scale)
        check_number("tau_scale", scale)
        self.tau_scale.fill_(scale)
        self._tau_scale = float(self.tau_scale)  # the fp32 value a checkpoint restores

    def spacing(self) -> float:
        """Median squared distance between neighbouring centroids, over all LUT groups:
        adjacent after sorting when ``cluster_dim`` is 1, else each centroid and its
        nearest other. 0 when a LUT has a single centroid."""
        c = self.centroids.detach().double()
        if c.shape[1] < 2:
            return 0.0
        if c.shape[-1] == 1:
            s = c[..., 0].sort(dim=1).values
            d2 = (s[:, 1:] - s[:, :-1]) ** 2
        else:
            d2 = torch.cdist(c, c) ** 2
            d2 = d2 + torch.diag_embed(torch.full(d2.shape[:2], math.inf, dtype=d2.dtype, device=d2.device))
            d2 = d2.min(dim=-1).values
        return float(d2.median())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "tau_scale"
        if key not in state_dict:  # a checkpoint from before tau_mode: one tau for every layer
            state_dict = {**state_dict, key: torch.ones(())}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        scale = float(self.tau_scale)
        if not (math.isfinite(scale) and scale > 0):
            error_msgs.append(f"{key} must be a finite number > 0, got {scale!r}")
        self._tau_scale = scale

    def _group_importance(self, importance: Tensor, shape: torch.Size) -> Tensor:
        """(out, in) importance -> (G, N) per point (summed over a vector's d entries), mean 1 per group."""
        if tuple(importance.shape) != tuple(shape):
            raise ValueError(f"importance shape {tuple(importance.shape)} does not match the weight's {tuple(shape)}")
        check_importance(importance)
        imp = importance.detach().double()
        per_point = to_points(imp, self.groups, self.config.cluster_dim).sum(-1)  # (G, N)
        mean = per_point.mean(1, keepdim=True)
        per_point = torch.where(mean > 0, per_point / torch.where(mean > 0, mean, 1.0), 1.0)
        return per_point.to(torch.bfloat16)

    def points(self, weight: Tensor) -> Tensor:
        """The (G, N, d) points clustered for ``weight`` (cast to ``cluster_dtype``)."""
        if self.config.cluster_dtype != "weight":
            weight = weight.to(getattr(torch, self.config.cluster_dtype))
        return to_points(weight, self.groups, self.config.cluster_dim)

    def _importance(self) -> Tensor | None:
        """The (G, N) importance, or None (`edkm.distributed.shard_importance` keeps it as (out, in / d))."""
        imp = getattr(self, "importance", None)
        return None if imp is None else imp.reshape(self.groups, -1)

    def train(self, mode: bool = True):
        """Switch train / eval mode; drops the eval-mode code cache (module docstring)."""
        self._codes = None
        return super().train(mode)

    def hard_codes(self, weight: Tensor) -> Tensor:
        """The (G, N) nearest-centroid index of every point of ``weight`` (ties to the
        lowest index) as uint8 (K <= 256: ``bits`` is at most 8); cached in eval mode (module
        docstring)."""
        c, cached = self.centroids, self._codes
        if cached is not None and cached[0] is weight and cached[1] == weight._version and cached[2] is c \
                and cached[3] == c._version and cached[4].device == weight.device:
            return cached[4]
        with torch.no_grad():
            idx = nearest(self.points(weight), c).to(torch.uint8)
        self._codes = (weight, weight._version, c, c._version, idx) if self.cache_codes and not self.training else None
        return idx

    def forward(self, weight: Tensor) -> Tensor:
        cfg, c = self.config, self.centroids
        if not self.training:
            idx = self.hard_codes(weight).long()
            hard = torch.gather(c, 1, idx.unsqueeze(-1).expand(-1, -1, c.shape[-1]))
            return hard.to(weight.dtype).reshape(weight.shape)
        cast = None if cfg.cluster_dtype == "weight" else getattr(torch, cfg.cluster_dtype)
        points = to_points(weight, self.groups, cfg.cluster_dim)  # a view of the weight; dkm casts it
        with offload_saved_tensors() if cfg.offload else contextlib.nullcontext():
            soft, new_c = dkm(points, c, tau=self.tau, max_iters=cfg.max_iters, eps=cfg.eps,
                              uniquify=cfg.uniquify, backend=cfg.backend, shard=cfg.shard,
                              importance=self._importance(), cast=cast, rebuild=cfg.rebuild)
        with torch.no_grad():
            self.drift.copy_((new_c - c).norm(dim=-1).max())
            self.centroids.copy_(new_c)
        return soft.reshape(weight.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        G, K, d = self.centroids.shape
        weighted = ", importance-weighted" if hasattr(self, "importance") else ""
        tau = "" if self._tau_scale == 1.0 else f", tau={self.tau:.3g}"
        return f"groups={G}, clusters={K}, cluster_dim={d}, uniquify={self.config.uniquify}{tau}{weighted}"


def clustered_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, DKMWeight]]:
    """Yield ``(name, module, parametrization)`` for every layer of ``model`` that
    `edkm.prepare` gave a `DKMWeight`."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, DKMWeight):
                    yield name, module, p
