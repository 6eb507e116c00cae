"""LoRD: activation-aware low-rank decomposition of linear layers that composes with DKM.

A dense layer W (out, in) becomes two ``nn.Linear`` factors, ``down`` = A (r, in) and
``up`` = B (out, r), chosen to minimise the error of the layer's *outputs* on calibration
inputs rather than ``||W - BA||`` (math in `edkm.lowrank.factor`). Layers that read the
same input (q/k/v, gate/up) can share one bottleneck A. Because the factors are plain
``nn.Linear``, `edkm.prepare` clusters them afterwards like any other layer::

    report = lowrank_model(model, calibration_batches, LowRankConfig(rank_reduction=0.25))
    print(report.summary())
    edkm.prepare(model, edkm.DKMConfig(bits=4))     # clusters up/down factors

Layout: `factor` (second moments, factorisation, parity), `modules` (`LowRankLinear`,
`decompose_linear`, `decompose_group`), `config` (`LowRankConfig`), `calibrate`
(hooks: input / output-gradient moments, input sharing), `budget` (sensitivity and rank
allocation), `model` (`lowrank_model`, reports).
"""

from edkm.lowrank.budget import allocate_ranks, direction_costs
from edkm.lowrank.calibrate import CalibrationStats, causal_lm_loss, collect_input_stats
from edkm.lowrank.config import LowRankConfig
from edkm.lowrank.decompose import LayerReport, LowRankReport, lowrank_model
from edkm.lowrank.factor import (
    DEFAULT_DAMPING,
    Factorization,
    SecondMoment,
    check_rank,
    factorize,
    parity_rank,
    relative_output_error,
)
from edkm.lowrank.layers import LowRankLinear, decompose_group, decompose_linear

__all__ = [
    "DEFAULT_DAMPING",
    "CalibrationStats",
    "Factorization",
    "LayerReport",
    "LowRankConfig",
    "LowRankLinear",
    "LowRankReport",
    "SecondMoment",
    "allocate_ranks",
    "causal_lm_loss",
    "check_rank",
    "collect_input_stats",
    "decompose_group",
    "decompose_linear",
    "direction_costs",
    "factorize",
    "lowrank_model",
    "parity_rank",
    "relative_output_error",
]
