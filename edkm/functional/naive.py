"""The naive (N, K) autograd DKM: the independent spec for values and gradients.

It runs `edkm.functional.iterations.dkm_iterations` on all N points and lets autograd
keep every (G, N, K) intermediate. That is its purpose (a reference that knows nothing
of tables, patterns or hand-derived backwards), not a training path for large layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edkm.functional.iterations import Reduce, dkm_iterations, math_dtype


def dkm_naive(points: Tensor, centroids: Tensor, tau: float, max_iters: int, eps: float,
              reduce: Reduce | None = None, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain autograd DKM on all N points (the gradient reference).

    Args:
        points: (G, N, d) any float dtype. centroids: (G, K, d) warm start.
        reduce: differentiable sum over ranks when ``points`` is this rank's shard.
        importance: (G, N) per-point weights of the centroid updates (constants), or
            None for unit weights.
    Returns:
        ``(soft_points, new_centroids)``: (G, N, d) in ``points.dtype`` and (G, K, d)
        detached centroids in the math dtype (fp32; fp64 for fp64 points).
    """
    x = points.to(math_dtype(points.dtype))
    c0 = centroids.detach().to(x.dtype, copy=True)  # the caller may update it in place
    weights = None if importance is None else importance.detach().to(x.dtype)
    a_last, _, c_last, _ = dkm_iterations(x, weights, c0, tau, max_iters, eps, reduce=reduce)
    out = torch.einsum("gnk,gkd->gnd", a_last, c_last)  # (G, N, d)
    return out.to(points.dtype), c_last.detach()
