"""The LUT layers that `edkm.finalize` leaves (deployment time).

`LUTLinear` / `LUTEmbedding` hold a LUT (G, K, d) in the weight's dtype and uint8
indices (out, in / d) (`edkm.finalize` picks them with `edkm.functional.assign_codes`).

Decode cache: in eval mode a LUT layer keeps its decoded dense weight, in the dtype it was
last used with, so generation does not re-decode every weight on every token. The cache
is rebuilt when ``lut`` or ``indices`` is replaced or changed in place (tensor identity and
version counter), when the dtype or device changes, and dropped by ``train()``. It costs one
dense weight per layer (for a model in eval mode, the float model's weight memory); set
``layer.cache_decoded = False`` to decode per call instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _LUTMixin:
    """Shared LUT storage: buffers ``lut`` (G, K, d) and ``indices`` (out, in / d) uint8."""

    def _init_lut(self, lut: Tensor, indices: Tensor, shape: tuple[int, int]) -> None:
        if lut.shape[1] > 256:
            raise ValueError(f"uint8 indices hold at most 256 centroids, got {lut.shape[1]}")
        self.register_buffer("lut", lut)
        self.register_buffer("indices", indices.to(torch.uint8))
        self.weight_shape = shape
        self.cache_decoded = True
        self._decoded: tuple | None = None  # (lut, lut version, indices, indices version, dtype, weight)

    def dense_weight(self) -> Tensor:
        """The (out, in) weight decoded from LUT and indices."""
        G, K, d = self.lut.shape
        idx = self.indices.reshape(G, -1).long()  # (G, N)
        w = torch.gather(self.lut, 1, idx.unsqueeze(-1).expand(-1, -1, d))  # (G, N, d)
        return w.reshape(self.weight_shape)

    def decoded_weight(self, dtype: torch.dtype) -> Tensor:
        """`dense_weight` in ``dtype``, cached in eval mode (see the module header).

        Args:
            dtype: Compute dtype of the caller.
        Returns:
            The (out, in) weight; the same tensor object while the cache is valid.
        """
        if self.training or not self.cache_decoded or torch.is_grad_enabled() and self.lut.requires_grad:
            self._decoded = None
            return self.dense_weight().to(dtype)
        c, lut, idx = self._decoded, self.lut, self.indices
        if c is None or c[0] is not lut or c[1] != lut._version or c[2] is not idx or c[3] != idx._version \
                or c[4] != dtype:
            # Holding lut / indices keeps their ids from being reused by a replacement.
            with torch.no_grad():
                c = (lut, lut._version, idx, idx._version, dtype, self.dense_weight().to(dtype))
            self._decoded = c
        return c[5]

    def train(self, mode: bool = True):
        """Switch train / eval mode; drops the decode cache."""
        self._decoded = None
        return super().train(mode)


class LUTLinear(_LUTMixin, nn.Module):
    """A finalized linear layer: ``y = x W^T + b`` with W decoded from a LUT."""

    def __init__(self, lut: Tensor, indices: Tensor, bias: Tensor | None, shape: tuple[int, int]) -> None:
        super().__init__()
        self._init_lut(lut, indices, shape)
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.decoded_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        G, K, d = self.lut.shape
        return f"in={self.in_features}, out={self.out_features}, groups={G}, clusters={K}, cluster_dim={d}"


class LUTEmbedding(_LUTMixin, nn.Module):
    """A finalized embedding table decoded from a LUT."""

    def __init__(self, lut: Tensor, indices: Tensor, shape: tuple[int, int], padding_idx: int | None) -> None:
        super().__init__()
        self._init_lut(lut, indices, shape)
        self.num_embeddings, self.embedding_dim = shape
        self.padding_idx = padding_idx

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.decoded_weight(self.lut.dtype), self.padding_idx)
