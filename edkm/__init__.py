"""edkm: train-time weight clustering (differentiable k-means) with the eDKM memory techniques.

Library use::

    import edkm
    edkm.prepare(model, edkm.DKMConfig(bits=4))   # layers now train through DKM
    ...your training loop...
    edkm.finalize(model)                           # hard LUT + uint8 indices

Importing edkm before torch sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set (see
`edkm._threads`).
"""

from edkm import _threads  # noqa: F401  (first: before torch loads its OpenMP runtime)
from edkm.compensate import compensate, input_hessians
from edkm.config import DKMConfig
from edkm.deploy.coreml import export_coreml
from edkm.distill import DistillTrainerMixin, distill_loss, topk_distill_loss
from edkm.export import export_compressed, load_compressed
from edkm.functional import dkm, kmeans_init
from edkm.importance import fisher_importance
from edkm.layers import DKMWeight, LUTEmbedding, LUTLinear
from edkm.lowrank import LowRankConfig, LowRankLinear, lowrank_model
from edkm.offload import OffloadStats, offload_saved_tensors
from edkm.preparation import centroid_drift, clustered_layers, finalize, prepare

__all__ = [
    "DKMConfig",
    "DKMWeight",
    "DistillTrainerMixin",
    "LUTEmbedding",
    "LUTLinear",
    "LowRankConfig",
    "LowRankLinear",
    "centroid_drift",
    "clustered_layers",
    "compensate",
    "distill_loss",
    "dkm",
    "export_compressed",
    "export_coreml",
    "finalize",
    "fisher_importance",
    "input_hessians",
    "kmeans_init",
    "load_compressed",
    "lowrank_model",
    "offload_saved_tensors",
    "OffloadStats",
    "prepare",
    "topk_distill_loss",
]
__version__ = "0.1.0"
