"""Configuration for weight clustering: one frozen, validated dataclass.

`DKMConfig` says which layers are clustered and how. Validation happens at construction
and every error message carries the bad value. `to_dict` / `from_dict` round-trip through
plain Python types (YAML, JSON, checkpoints); unknown keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping

from edkm._checks import check_int, check_number, check_patterns

GRANULARITIES = ("per_tensor", "per_grouped_channel")
BACKENDS = ("auto", "torch", "triton", "c")
CLUSTER_DTYPES = ("weight", "bfloat16", "float16")
TAU_MODES = ("global", "gap")
# Fields a `DKMConfig.layers` entry may set for the layers its pattern matches: the LUT's
# shape (how many centroids, over which weights). Training settings (tau, iterations,
# backend) stay global so the trainer's schedules apply to every layer alike.
LAYER_KEYS = ("bits", "group_size", "granularity", "cluster_dim")

# Module names matched against include/exclude glob patterns (fnmatch). By default the
# embeddings and the LM head are left out: they are not nn.Linear inside the decoder and
# clustering them costs a lot of accuracy for little memory in small models.
DEFAULT_EXCLUDE = ("lm_head", "*embed_tokens*")

# The smallest tau for which ``squared distance / tau`` stays finite in fp32 for any two
# weights in the 16-bit range: (2 * 65504)**2 / 3.4028e38 = 5.04e-29. Below it, a row
# whose distances all overflow to inf turns softmax(-D / tau) into NaN (tau=1e-40 did).
TAU_MIN = (2 * 65504.0) ** 2 / 3.4028234663852886e38


class ConfigDict:
    """``to_dict`` / ``from_dict`` / ``replace`` for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (tuples become lists) for YAML/JSON/checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DKMConfig(ConfigDict):
    """How to cluster weights with differentiable k-means.

    Args:
        bits: LUT size is ``2**bits`` centroids, 1..8.
        cluster_dim: Length of the vectors that are clustered together (1 = scalar LUT).
            Must divide each selected layer's input features.
        granularity: ``"per_tensor"`` (one LUT per weight) or ``"per_grouped_channel"``
            (one LUT per block of ``group_size`` output channels).
        group_size: Output channels per LUT when grouped; must divide each selected
            layer's output features.
        tau: Softmax temperature of the soft assignment ``softmax(-||w - c||^2 / tau)``.
        tau_mode: ``"global"``: every layer uses ``tau``. ``"gap"``: each layer's tau is
            ``tau`` times its own centroid spacing over the median spacing of all layers
            `edkm.prepare` clustered together, so a layer with tightly packed centroids is
            not trained much softer than one with wide ones (at one tau of 1e-4 some of
            SmolLM2's attention projections had most of their Fisher mass assigned with
            probability < 0.9 while the MLPs were near hard). A layer's spacing is the
            median squared distance between neighbouring initial centroids (adjacent
            after sorting for ``cluster_dim`` 1, each centroid and its nearest other for
            larger ``cluster_dim``). The factor is fixed at `edkm.prepare` and kept in the
            layer's ``state_dict`` (``tau_scale``), so a resumed run does not recompute it
            from trained centroids.
        max_iters: k-means iterations unrolled per forward (gradients flow through all).
        eps: Stop the iterations early once no centroid moves more than ``eps``; 0 runs
            exactly ``max_iters``.
        uniquify: Compute on the table of distinct weight values (exact, no (N, K) map)
            instead of the naive per-weight (N, K) autograd graph.
        backend: ``"auto"`` (Triton on CUDA; on the CPU the C table kernels when a C compiler
            built them, else torch), ``"torch"``, ``"triton"`` or ``"c"`` (`edkm.functional.dkm`).
        shard: Split the DKM work and saved state across data-parallel ranks when
            torch.distributed is initialised (exact; no effect in one process).
        offload: Run the clustering forward under `edkm.offload_saved_tensors` (saved
            tensors go to CPU memory until backward).
        rebuild: Hold only the centroid history for backward (a few KB per layer) and
            rebuild the table of distinct values from the weight in backward, instead of
            holding the table (16 bytes per distinct value per LUT group: 31% of a bf16
            weight's bytes with 16-row groups at LLaMA-7B attention shapes, 0.2% per
            tensor; `bench.ablation`) and, with ``cluster_dtype``, the 16-bit cast (2
            bytes per weight). Costs one more table build per step (about 1.6x the DKM
            time of `bench.ablation`'s grouped row); results are bitwise the same. Table
            path (``uniquify``) on one process (not with ``shard``).
        cluster_dtype: ``"weight"`` clusters the weight in its own dtype; ``"bfloat16"`` /
            ``"float16"`` cluster a 16-bit cast of fp32 master weights (gradients flow
            back through the cast), which gives uniquification its 65,536-value bound.
        include: Glob patterns of module names to cluster (``("*",)`` = all nn.Linear).
        exclude: Glob patterns of module names never clustered.
        include_embeddings: Also cluster the embeddings and the LM head (overrides the
            default exclusion of ``lm_head`` and ``*embed_tokens*``).
        min_weight_numel: Layers with fewer weights than this are left alone.
        init_iters: Lloyd iterations of the one-off k-means that initialises centroids.
        seed: Seed of the k-means++ initialisation.
        layers: Per-layer LUT shapes (mixed precision): ``{glob pattern: {key: value}}``
            with keys from ``LAYER_KEYS`` (``bits``, ``group_size``, ``granularity``,
            ``cluster_dim``), e.g. ``{"*.v_proj": {"bits": 5}}``. A layer takes the
            first pattern (in order) that matches its module name, else the top-level
            values; patterns select nothing by themselves (``include`` / ``exclude``
            do). `for_layer` gives a layer's config. Stored as a tuple of
            ``(pattern, ((key, value), ...))``; ``to_dict`` writes the mapping back.
    """

    bits: int = 4
    cluster_dim: int = 1
    granularity: str = "per_tensor"
    group_size: int = 16
    tau: float = 1e-4
    tau_mode: str = "global"
    max_iters: int = 3
    eps: float = 0.0
    uniquify: bool = True
    backend: str = "auto"
    cluster_dtype: str = "weight"
    shard: bool = False
    offload: bool = False
    rebuild: bool = False
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    include_embeddings: bool = False
    min_weight_numel: int = 1024
    init_iters: int = 30
    seed: int = 0
    layers: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def __post_init__(self) -> None:
        # Lists from YAML become tuples so the config stays hashable and frozen.
        for name in ("include", "exclude"):
            object.__setattr__(self, name, check_patterns(name, getattr(self, name)))
        check_int("bits", self.bits, 1, 8)
        check_int("cluster_dim", self.cluster_dim, 1, 64)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        check_int("group_size", self.group_size, 1, None)
        check_number("tau", self.tau)
        if self.tau < TAU_MIN:
            raise ValueError(f"tau must be >= {TAU_MIN:.3g} so that squared distance / tau stays finite in fp32 "
                             f"(16-bit weights), got {self.tau!r}")
        if self.tau_mode not in TAU_MODES:
            raise ValueError(f"tau_mode must be one of {TAU_MODES}, got {self.tau_mode!r}")
        check_int("max_iters", self.max_iters, 1, 1000)
        check_number("eps", self.eps, inclusive=True)
        for name in ("uniquify", "shard", "offload", "rebuild", "include_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.rebuild and not self.uniquify:
            raise ValueError("rebuild=True rebuilds the table of distinct values in backward; it needs uniquify=True, "
                             f"got uniquify={self.uniquify!r}")
        if self.rebuild and self.shard:
            raise ValueError(f"rebuild=True runs DKM in one process; it cannot be combined with shard={self.shard!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.cluster_dtype not in CLUSTER_DTYPES:
            raise ValueError(f"cluster_dtype must be one of {CLUSTER_DTYPES}, got {self.cluster_dtype!r}")
        check_int("min_weight_numel", self.min_weight_numel, 0, None)
        check_int("init_iters", self.init_iters, 0, 10_000)
        check_int("seed", self.seed, 0, None)
        object.__setattr__(self, "layers", _layer_entries(self.layers))
        for pattern, items in self.layers:  # each entry must make a valid config
            try:
                dataclasses.replace(self, layers=(), **dict(items))
            except ValueError as err:
                raise ValueError(f"layers[{pattern!r}]: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (tuples become lists, ``layers`` a ``{pattern: {key: value}}``)."""
        out = super().to_dict()
        out["layers"] = {pattern: dict(items) for pattern, items in self.layers}
        return out

    def layer_pattern(self, name: str) -> str | None:
        """The first ``layers`` pattern that matches the module called ``name`` (the one
        `for_layer` applies), or None."""
        return next((pattern for pattern, _ in self.layers if fnmatch.fnmatchcase(name, pattern)), None)

    def for_layer(self, name: str) -> "DKMConfig":
        """The config of the layer called ``name``: the first matching ``layers`` entry's
        values over the top-level ones (``layers`` emptied), or this config's values."""
        items = dict(self.layers).get(self.layer_pattern(name))
        if items is not None:
            return dataclasses.replace(self, layers=(), **dict(items))
        return dataclasses.replace(self, layers=()) if self.layers else self

    @property
    def n_clusters(self) -> int:
        """Number of centroids per LUT, ``2**bits``."""
        return 2**self.bits

    def selects(self, name: str) -> bool:
        """Whether the module called ``name`` is chosen by include/exclude patterns."""
        exclude = self.exclude if self.include_embeddings else self.exclude + DEFAULT_EXCLUDE
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.include)


def _layer_entries(value: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """``layers`` as given (a mapping, or pairs of pattern and mapping / items) in canonical form."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(e, (list, tuple)) and len(e) == 2 for e in value):
        pairs = list(value)
    else:
        raise ValueError(f"layers must be a mapping {{pattern: {{key: value}}}}, got {value!r}")
    out = []
    for pattern, items in pairs:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"layers patterns must be non-empty strings, got {pattern!r}")
        try:
            items = dict(items) if isinstance(items, (Mapping, list, tuple)) else items
        except (TypeError, ValueError):
            pass
        if not isinstance(items, dict) or not items:
            raise ValueError(f"layers[{pattern!r}] must be a non-empty mapping of {LAYER_KEYS}, got {items!r}")
        bad = sorted(set(items) - set(LAYER_KEYS))
        if bad:
            raise ValueError(f"layers[{pattern!r}]: key(s) {bad} cannot differ per layer; allowed: {list(LAYER_KEYS)}")
        out.append((pattern, tuple(sorted(items.items()))))
    return tuple(out)
