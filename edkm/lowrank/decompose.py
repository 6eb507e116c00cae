"""Model-level LoRD: calibrate, pick ranks, decompose selected layers in place, report.

`lowrank_model` runs in three steps:

1. `edkm.lowrank.calibrate.collect_input_stats`: hooks on every selected ``nn.Linear``
   accumulate ``S = sum x x^T`` of its inputs in float64 over the calibration batches
   (never the raw activations), and record which layers read the same input tensor
   (q/k/v, gate/up). In ``budget`` mode with ``sensitivity="fisher"`` the pass also runs
   a backward for the output-gradient moments.
2. Each unit (a layer, or with ``groups`` a stack of layers reading one input) is
   factorised once at full rank (`edkm.lowrank.factor.factorize`); any rank is then a
   truncation. Ranks come from ``rank_reduction`` (uniform) or ``budget``
   (`edkm.lowrank.budget`).
3. Units are replaced by `LowRankLinear` modules and a `LowRankReport` gives rank, weights
   before / after and the relative output error on the calibration inputs per unit.

Limits: all statistics come from the dense model in one pass (upstream layers are not
re-run after they are decomposed), so errors compound across layers unmeasured here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, MutableMapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from edkm.lowrank.budget import allocate_ranks, direction_costs
from edkm.lowrank.calibrate import CalibrationStats, LossFn, causal_lm_loss, collect_input_stats
from edkm.lowrank.config import LowRankConfig
from edkm.lowrank.factor import Factorization, check_rank, factorize, output_error_terms, parity_rank
from edkm.lowrank.layers import LowRankLinear, build_from_factorization, stack_weights

log = logging.getLogger(__name__)

__all__ = ["LayerReport", "LowRankReport", "lowrank_model"]


@dataclass
class LayerReport:
    """One decomposed unit (a layer, or layers sharing one bottleneck).

    Attributes:
        name: The unit's label (the layer name, or ``prefix.{a,b,c}`` for a group).
        members: Layer names in the unit (the first owns the shared ``down``).
        shape: (out, in) of the (stacked) weight.
        rank: Rank kept; None when the unit stays dense (``budget`` mode).
        parity: Rank at which factors hold as many weights as the dense weight.
        params_before: Weights and biases of the members before.
        params_after: Weights and biases after (the shared A counted once).
        rel_error: ``||(W - BA) X^T||^2 / ||W X^T||^2`` on the calibration inputs (undamped).
        member_errors: The same per member layer.
    """

    name: str
    members: tuple[str, ...]
    shape: tuple[int, int]
    rank: int | None
    parity: float
    params_before: int
    params_after: int
    rel_error: float
    member_errors: dict[str, float] = field(default_factory=dict)


@dataclass
class LowRankReport:
    """What `lowrank_model` did: one `LayerReport` per unit, plus totals."""

    layers: list[LayerReport]
    config: LowRankConfig

    @property
    def params_before(self) -> int:
        """Weights + biases of all selected layers before."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        """Weights + biases of the same layers after."""
        return sum(r.params_after for r in self.layers)

    @property
    def removed_fraction(self) -> float:
        """Share of the selected layers' parameters removed."""
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict for JSON."""
        return {"config": self.config.to_dict(), "layers": [asdict(r) for r in self.layers],
                "params_before": self.params_before, "params_after": self.params_after}

    def summary(self) -> str:
        """A readable table: one row per unit, then totals."""
        method = "activation-aware" if self.config.activation_aware else "plain SVD"
        head = f"{'unit':<48} {'shape':>11} {'rank':>5} {'parity':>7} {'params':>19} {'rel.err':>9}"
        lines = [f"LoRD ({method}, damping={self.config.damping:g})", head, "-" * len(head)]
        for r in self.layers:
            rank = "dense" if r.rank is None else str(r.rank)
            params = f"{r.params_before}->{r.params_after}"
            lines.append(f"{_clip(r.name, 48):<48} {r.shape[0]:>5}x{r.shape[1]:<5} {rank:>5} {r.parity:>7.1f} "
                         f"{params:>19} {r.rel_error:>9.2e}")
        lines.append("-" * len(head))
        lines.append(f"{len(self.layers)} units, params {self.params_before} -> {self.params_after} "
                     f"({100 * self.removed_fraction:.1f}% removed)")
        return "\n".join(lines)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3):]


def lowrank_model(
    model: nn.Module,
    calibration_batches: Iterable[Any] | None,
    config: LowRankConfig,
    *,
    stats: CalibrationStats | None = None,
    cache: MutableMapping[tuple, Factorization] | None = None,
    loss_fn: LossFn | None = None,
) -> LowRankReport:
    """Decompose the selected ``nn.Linear`` layers of ``model`` in place (LoRD).

    Args:
        model: Any module; layers are matched by name with ``config.include/exclude``.
        calibration_batches: Inputs for `collect_input_stats` (ignored when ``stats``).
        config: What to decompose and how.
        stats: Precomputed `collect_input_stats` over the same dense model (with
            ``loss_fn`` for a ``fisher`` budget).
        cache: Dict reused across calls on copies of the same dense model: full
            factorisations keyed by (stats uid, members, activation_aware, damping)
            are computed once.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for the ``fisher`` budget
            (default `causal_lm_loss`); unused otherwise.
    Returns:
        The per-unit report. Raises ``ValueError`` if nothing is selected or a selected
        layer is already parametrized (decompose before `edkm.prepare`).
    """
    modules = dict(model.named_modules())
    factors = {n for n, m in modules.items() if isinstance(m, LowRankLinear)}  # never decompose a factor again
    names = [n for n, m in modules.items()
             if isinstance(m, nn.Linear) and config.selects(n) and n.rpartition(".")[0] not in factors]
    if not names:
        raise ValueError(f"no nn.Linear matched include={config.include} exclude={config.exclude}")
    for n in names:
        if parametrize.is_parametrized(modules[n]):
            raise ValueError(f"layer {n!r} is parametrized (edkm.prepare already ran?); run lowrank_model first")
    fisher = config.budget is not None and config.sensitivity == "fisher"
    if stats is None:
        if calibration_batches is None:
            raise ValueError("give calibration_batches or precomputed stats")
        stats = collect_input_stats(model, calibration_batches, names,
                                    loss_fn=(loss_fn or causal_lm_loss) if fisher else None)
    if fisher and any(n not in stats.grads for n in names):
        raise ValueError("budget with sensitivity='fisher' needs output-gradient statistics: collect them with "
                         "collect_input_stats(..., loss_fn=...) or use sensitivity='spectrum'")
    selected = set(names)
    units: list[tuple[str, ...]] = []
    for group in stats.groups:
        members = tuple(n for n in group if n in selected)
        if members:
            units += [members] if config.groups else [(n,) for n in members]
    missing = selected - {n for u in units for n in u}
    if missing:
        raise ValueError(f"stats hold no inputs for layers {sorted(missing)}")
    facts = []
    for unit in units:
        key = (stats.uid, unit, config.activation_aware, float(config.damping))
        fact = cache.get(key) if cache is not None else None
        if fact is None:
            w = stack_weights([modules[n] for n in unit], unit)
            fact = factorize(w, stats.moment(unit[0]), activation_aware=config.activation_aware, damping=config.damping)
            if cache is not None:
                cache[key] = fact
        facts.append(fact)
    if config.budget is not None:
        costs = [
            direction_costs(f, config.sensitivity, member_outs=[modules[n].out_features for n in u],
                            input_moment=stats.moment(u[0]), grad_moments=[stats.grads.get(n) for n in u],
                            damping=config.damping)
            for u, f in zip(units, facts)
        ]
        ranks = allocate_ranks([f.shape for f in facts], costs, config.budget, rank_multiple=config.rank_multiple)
    else:
        ranks = [_uniform_rank(f.shape, config) for f in facts]
    reports = [_replace_unit(model, modules, unit, fact, rank, stats) for unit, fact, rank in zip(units, facts, ranks)]
    report = LowRankReport(reports, config)
    log.info("LoRD: %d units, params %d -> %d (%.1f%% removed)", len(reports), report.params_before,
             report.params_after, 100 * report.removed_fraction)
    return report


def _uniform_rank(shape: tuple[int, int], config: LowRankConfig) -> int:
    out_f, in_f = shape
    p = parity_rank(out_f, in_f)
    rank = math.floor((1.0 - config.rank_reduction) * p)
    if rank * (out_f + in_f) >= out_f * in_f:  # p an integer: (1 - f) * p may floor back to p
        rank -= 1
    rank = rank // config.rank_multiple * config.rank_multiple
    return max(rank, config.rank_multiple)


def _replace_unit(
    model: nn.Module, modules: dict[str, nn.Module], unit: tuple[str, ...], fact: Factorization,
    rank: int | None, stats: CalibrationStats,
) -> LayerReport:
    linears = [modules[n] for n in unit]
    before = sum(p.numel() for lin in linears for p in lin.parameters())
    label = unit[0] if len(unit) == 1 else _group_label(unit)
    out_f, in_f = fact.shape
    if rank is None:
        return LayerReport(label, unit, (out_f, in_f), None, parity_rank(out_f, in_f), before, before, 0.0,
                           {n: 0.0 for n in unit})
    check_rank(rank, out_f, in_f, name=label)
    new = build_from_factorization(linears, fact, rank, unit)
    s_mat = stats.moment(unit[0]).matrix()
    b, a = fact.factors(rank)
    terms = {n: output_error_terms(lin.weight, w_hat, s_mat)
             for n, lin, w_hat in zip(unit, linears, (b @ a).split([lin.out_features for lin in linears]))}
    tiny = torch.finfo(torch.float64).tiny
    errors = {n: num / max(den, tiny) for n, (num, den) in terms.items()}
    total = sum(t[0] for t in terms.values()) / max(sum(t[1] for t in terms.values()), tiny)
    after = sum(p.numel() for m in new for p in m.parameters())  # members list up only; the owner also A
    for n, m in zip(unit, new):
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m)
    return LayerReport(label, unit, (out_f, in_f), rank, parity_rank(out_f, in_f), before, after, total, errors)


def _group_label(unit: tuple[str, ...]) -> str:
    prefixes = {n.rpartition(".")[0] for n in unit}
    if len(prefixes) == 1:
        prefix = prefixes.pop()
        return (prefix + "." if prefix else "") + "{" + ",".join(n.rpartition(".")[2] for n in unit) + "}"
    return "{" + ",".join(unit) + "}"
