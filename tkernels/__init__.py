"""Triton kernels of uniquified DKM (imported as `edkm.kernels`; needs triton).

Only @triton.jit code and launchers live here: no autograd, no model code. Each
``triton_x`` has a pure-PyTorch twin in `edkm.functional.table` (the CPU path itself;
`edkm.functional.triton_backend` maps the launchers onto its signatures), which is the
spec the tests hold it to. Kernels are for bf16 /
fp16 weights with cluster_dim 1 (a weight's table row is keyed by its 16-bit pattern).

    patterns.py    per-element passes: histogram, segment sum, gather, element grad
    table_fwd.py   table iterations and row values
    table_bwd.py   table backward through the final map and all iterations
    assign.py      hard nearest-centroid assignment with dense index packing

CPU tensors run only under TRITON_INTERPRET=1, which must be set before this package is
imported (the kernels are built for the interpreter at import).
"""

from edkm.kernels.assign import triton_assign_pack
from edkm.kernels.common import interpreting
from edkm.kernels.patterns import triton_element_grad, triton_gather_rows, triton_histogram, triton_segment_sum
from edkm.kernels.table_bwd import triton_table_bwd
from edkm.kernels.table_fwd import triton_table_iterate, triton_table_rows

__all__ = [
    "interpreting",
    "triton_assign_pack",
    "triton_element_grad",
    "triton_gather_rows",
    "triton_histogram",
    "triton_segment_sum",
    "triton_table_bwd",
    "triton_table_iterate",
    "triton_table_rows",
]
