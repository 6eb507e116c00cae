"""`LowRankLinear`: a linear layer run as two factors, and the functions that build it.

``LowRankLinear`` computes ``up(down(x))`` with ``down = nn.Linear(in, r, bias=False)``
(A) and ``up = nn.Linear(r, out)`` (B, carrying the original bias). Both factors are plain
``nn.Linear`` modules, so `edkm.prepare` clusters them like any other layer and
`edkm.finalize` turns them into ``LUTLinear``.

Grouped layers (q/k/v, gate/up: layers that read the same input) share one bottleneck A.
The first member owns ``down`` as a registered submodule; the others hold an unregistered
reference to that owner, and their ``down`` property reads the owner's current ``down``.
So ``named_modules`` / ``state_dict`` / `edkm.prepare` see the shared A exactly once
(under the owner's name), and when `edkm.finalize` replaces the owner's ``down`` by a
LUT layer every member uses it.

The owner caches its last bottleneck output: members called on the very same input tensor
object (same version, grad mode and factor weights) reuse it, so A runs, and is
DKM-clustered, once per forward for the whole group. The cache holds a weak reference to
the input and is dropped when that input dies, on pickling and on deepcopy.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edkm.lowrank.factor import DEFAULT_DAMPING, Factorization, SecondMoment, check_rank, factorize

__all__ = ["LowRankLinear", "decompose_group", "decompose_linear", "build_from_factorization"]


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a (out, in) linear layer as rank-r factors B (out, r) and A (r, in).

    Args:
        down: ``nn.Linear(in, r, bias=False)`` (or a layer that replaced it); None for a
            group member that shares ``source``'s bottleneck.
        up: ``nn.Linear(r, out)`` with the original layer's bias.
        source: The group member that owns the shared ``down``; None for an owner.
        source_name: The owner's module name, for ``repr`` only.
    """

    def __init__(
        self, down: nn.Module | None, up: nn.Linear, source: "LowRankLinear | None" = None, source_name: str = ""
    ) -> None:
        super().__init__()
        if (down is None) == (source is None):
            raise ValueError("give exactly one of down (owner) or source (member sharing the owner's down)")
        if source is not None and source._source is not None:
            raise ValueError("source must own its down factor, not share another layer's")
        object.__setattr__(self, "_source", source)  # unregistered: the shared A is listed once
        object.__setattr__(self, "_cache", None)
        self._sharers = 1
        self.source_name = source_name
        if down is not None:
            self.down = down
        else:
            source._sharers += 1
        self.up = up
        if self.down.out_features != up.in_features:
            raise ValueError(f"down gives {self.down.out_features} features but up takes {up.in_features}")
        self.in_features = self.down.in_features
        self.out_features = up.out_features
        self.rank = up.in_features

    @property
    def down(self) -> nn.Module:  # type: ignore[override]
        """The bottleneck A (in -> r): this layer's own, or the group owner's current one."""
        owner = self if self._source is None else self._source
        return owner._modules["down"]

    @property
    def shares_down(self) -> bool:
        """True for a group member that reads another layer's ``down``."""
        return self._source is not None

    def forward(self, x: Tensor) -> Tensor:
        owner = self if self._source is None else self._source
        return self.up(owner._bottleneck(x))

    def _bottleneck(self, x: Tensor) -> Tensor:
        down = self._modules["down"]
        if self._sharers == 1:
            return down(x)
        cache = self._cache
        if cache is not None and cache[0]() is x and cache[1] == self._cache_key(x, down):
            return cache[2]
        y = down(x)
        holder = weakref.ref(self)

        def drop(_: weakref.ref) -> None:  # the input died: free the cached activation
            owner = holder()
            if owner is not None:
                object.__setattr__(owner, "_cache", None)

        # Key taken after the call: a DKM parametrization bumps its centroid buffer's version.
        object.__setattr__(self, "_cache", (weakref.ref(x, drop), self._cache_key(x, down), y))
        return y

    @staticmethod
    def _cache_key(x: Tensor, down: nn.Module) -> tuple:
        version = None if x.is_inference() else x._version  # inference tensors keep no version
        state = tuple((id(t), t._version) for t in (*down.parameters(), *down.buffers()) if not t.is_inference())
        return version, torch.is_grad_enabled(), down.training, state

    def dense_weight(self) -> Tensor:
        """The (out, in) product ``B @ A`` (decoded from LUTs after `edkm.finalize`)."""
        return _weight(self.up) @ _weight(self.down)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # holds a weakref and maybe a graph: never copied
        return state

    def extra_repr(self) -> str:
        shared = f", down shared with {self.source_name or 'group owner'}" if self._source is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{shared}"


def _weight(module: nn.Module) -> Tensor:
    dense = getattr(module, "dense_weight", None)
    return dense() if callable(dense) else module.weight


def build_from_factorization(
    linears: Sequence[nn.Linear], factorization: Factorization, rank: int, names: Sequence[str] | None = None
) -> list[LowRankLinear]:
    """Replacement modules for ``linears`` (stacked vertically) from a factorisation.

    Args:
        linears: Layers whose weights were stacked, in stacking order.
        factorization: Factorisation of the stacked weight.
        rank: Rank kept (validated by the caller).
        names: Layer names (the owner's appears in the members' ``repr``).
    Returns:
        One `LowRankLinear` per layer; the first owns the shared ``down``.
    """
    b, a = factorization.factors(rank)  # (sum out, r), (r, in)
    ref = linears[0].weight
    down = torch.nn.utils.skip_init(nn.Linear, a.shape[1], rank, bias=False, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        down.weight.copy_(a)
    out: list[LowRankLinear] = []
    for lin, b_part in zip(linears, b.split([lin.out_features for lin in linears])):
        has_bias = lin.bias is not None
        up = torch.nn.utils.skip_init(
            nn.Linear, rank, lin.out_features, bias=has_bias, device=ref.device, dtype=lin.weight.dtype
        )
        with torch.no_grad():
            up.weight.copy_(b_part)
            if has_bias:
                up.bias.copy_(lin.bias)
        owner_name = names[0] if names else ""
        out.append(LowRankLinear(down, up) if not out else LowRankLinear(None, up, out[0], owner_name))
    return out


def stack_weights(linears: Sequence[nn.Module], names: Sequence[str] | None = None) -> Tensor:
    """Validate ``linears`` and stack their weights vertically: (sum out, in), float64."""
    names = list(names) if names is not None else [f"linears[{i}]" for i in range(len(linears))]
    if not linears:
        raise ValueError("need at least one layer to decompose")
    for lin, name in zip(linears, names):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} must be an nn.Linear, got {type(lin).__name__}")
        if parametrize.is_parametrized(lin):
            raise ValueError(f"{name} is parametrized (edkm.prepare already ran?); decompose before prepare")
    in_features = {lin.in_features for lin in linears}
    if len(in_features) != 1:
        shapes = {name: tuple(lin.weight.shape) for lin, name in zip(linears, names)}
        raise ValueError(f"grouped layers must read the same input size, got weight shapes {shapes}")
    return torch.cat([lin.weight.detach().to(torch.float64) for lin in linears])


def decompose_group(
    linears: Sequence[nn.Linear],
    inputs: Tensor | SecondMoment,
    rank: int,
    activation_aware: bool = True,
    *,
    damping: float = DEFAULT_DAMPING,
    allow_beyond_parity: bool = False,
    names: Sequence[str] | None = None,
) -> list[LowRankLinear]:
    """Decompose layers that read the same input with one shared bottleneck A.

    The weights are stacked vertically, factorised once, and B is split by rows; at full
    rank the group reproduces every layer exactly.

    Args:
        linears: ``nn.Linear`` layers with equal ``in_features``.
        inputs: Their (shared) calibration inputs (..., in), or their `SecondMoment`.
        rank: Rank of the shared bottleneck; must stay below the parity point of the
            stacked (sum out, in) weight unless ``allow_beyond_parity``.
        activation_aware: Minimise the output error on ``inputs`` (False: plain SVD).
        damping: Relative damping of the inputs' second moment.
        allow_beyond_parity: Warn instead of raising for ranks that save no parameters.
        names: Layer names for messages.
    Returns:
        One `LowRankLinear` per layer, in order; the first owns the shared ``down``.
    """
    w = stack_weights(linears, names)  # (sum out, in)
    label = "group " + "+".join(names) if names is not None else f"group of {len(linears)} layers"
    if len(linears) == 1:
        label = names[0] if names is not None else "linear"
    moment = inputs if isinstance(inputs, SecondMoment) else _moment(inputs, w.shape[1], label)
    if moment.in_features != w.shape[1]:
        raise ValueError(
            f"{label}: inputs have {moment.in_features} features but the weight has in_features={w.shape[1]}"
        )
    check_rank(rank, w.shape[0], w.shape[1], name=label, allow_beyond_parity=allow_beyond_parity)
    fact = factorize(w, moment, activation_aware=activation_aware, damping=damping)
    return build_from_factorization(linears, fact, rank, names)


def decompose_linear(
    linear: nn.Linear,
    inputs: Tensor | SecondMoment,
    rank: int,
    activation_aware: bool = True,
    *,
    damping: float = DEFAULT_DAMPING,
    allow_beyond_parity: bool = False,
    name: str = "linear",
) -> LowRankLinear:
    """Replace one ``nn.Linear`` by rank-``rank`` factors that best keep its outputs.

    Args:
        linear: The dense layer (out, in); left unchanged.
        inputs: Calibration inputs (..., in) as the layer sees them, or their `SecondMoment`.
        rank: Rank r, in ``[1, min(out, in)]`` and below ``out*in/(out+in)``.
        activation_aware: Minimise output error on ``inputs`` (False: plain SVD of W).
        damping: Relative damping of the inputs' second moment (see `factorize`).
        allow_beyond_parity: Warn instead of raising for ranks that save no parameters.
        name: Layer name for messages.
    Returns:
        A `LowRankLinear` on the layer's device and dtype.
    """
    return decompose_group(
        [linear], inputs, rank, activation_aware, damping=damping,
        allow_beyond_parity=allow_beyond_parity, names=[name],
    )[0]


def _moment(inputs: Tensor, in_features: int, label: str) -> SecondMoment:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{label}: inputs must be a Tensor (..., in) or a SecondMoment, got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[-1] != in_features:
        raise ValueError(
            f"{label}: inputs of shape {tuple(inputs.shape)} do not match in_features={in_features} "
            "(expected (..., in_features))"
        )
    if inputs.numel() == 0:
        raise ValueError(f"{label}: inputs of shape {tuple(inputs.shape)} hold no rows")
    return SecondMoment.from_inputs(inputs)
