"""Triton kernels (`edkm.kernels`) against the torch implementation and the naive DKM reference.

Without CUDA the kernels run on CPU tensors in the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported), so shapes are small. With CUDA the
same tests run the compiled kernels. The torch side is `edkm.functional.table`, the code
the CPU path runs; the kernel side goes through `edkm.functional.triton_backend`, the adapter
the autograd Function uses, so both are tested with the signatures production calls.

Tolerances: the one rule of tests/tolerance.py. fp32 results: error against fp64 at most
twice the torch path's own error plus 1e-5. 16-bit results against the torch path, per
element in that element's ulps: 0 where the kernel runs the same ops (gather), at most 1
where only the fp32 value before the one cast can differ (FMA in the element gradient).
Discrete outputs (histograms, codes) are bit-exact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from tolerance import assert_ulps, assert_within_rule  # noqa: E402

from edkm import kernels as K  # noqa: E402
from edkm.functional import (  # noqa: E402
    assign_codes,
    dkm,
    kmeans_init,
    passes,  # noqa: E402
    resolve_backend,
    triton_ops,
)
from edkm.functional import table as tbl  # noqa: E402
from edkm.functional.autograd import TORCH_OPS, dkm_table  # noqa: E402
from edkm.functional.packing import nearest, unpack_codes  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TAU = 1e-4
DTYPES = [torch.bfloat16, torch.float16]
# (groups, points per group): a real scaled-down shape and odd, non-power-of-two ones.
SHAPES = [(1, 1000), (1, 4097), (3, 700)]
TRITON = triton_ops()

if K.interpreting() and DEVICE.type == "cuda":  # pragma: no cover - misconfigured environment
    pytest.skip("TRITON_INTERPRET=1 with CUDA present: the interpreter would run CUDA tensors", allow_module_level=True)


def _weights(groups: int, n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N, 1) LLaMA-like weights (std 0.02) with edge patterns mixed in, and a gradient."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, n, generator=gen) * 0.02
    special = torch.tensor([0.0, -0.0, 1e-6, -3e-8, 0.25, -0.25, 0.0999])  # zeros, tiny, exact ties
    w[:, : special.numel()] = special
    g = torch.randn(groups, n, generator=gen)
    g[:, 1] = 1e-40  # a gradient that is subnormal in fp32 (flushes to 0 in fp16)
    return w.to(dtype).to(DEVICE).unsqueeze(-1), g.to(dtype).to(DEVICE).unsqueeze(-1)


def _table(w: torch.Tensor, k: int):
    """The torch table of (G, N, 1) 16-bit weights, its index for the torch passes and its
    row map for the kernels, and k-means centroids (G, K, 1)."""
    table = tbl.build_table(w)
    return table, (table.index(), TRITON.index(table)), kmeans_init(w, k, iters=5)


def _to64(*ts):
    return tuple(t.double() for t in ts)


# ---------------------------------------------------------------------------- per-element


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups,n", SHAPES)
def test_histogram_is_bit_exact(groups, n, dtype):
    w, _ = _weights(groups, n, dtype)
    got = K.triton_histogram(w[..., 0])
    want = tbl.histogram(w)
    assert got.dtype == want.dtype == torch.int32 and got.shape == (groups, 65536)
    mismatch = (got != want).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} bins differ, first (group, pattern) {mismatch[0].tolist()}"
    assert int(got.sum()) == groups * n


def test_table_build_matches_the_kernel_histogram():
    w, _ = _weights(3, 700, torch.bfloat16)
    got, want = TRITON.build(w), TORCH_OPS.build(w)
    for name in ("values", "counts", "keys"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def _with_rounding_ties(rows: torch.Tensor, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Overwrite every other row value by an fp32 exactly halfway between two ``dtype`` values."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows.shape, generator=gen) * 0.02).to(dtype).float()  # representable
    drop = 16 if dtype == torch.bfloat16 else 13  # fp32 mantissa bits the cast drops
    tie = (base.view(torch.int32) | (1 << (drop - 1))).view(torch.float32).to(rows.device)
    out = rows.clone()
    out[:, ::2] = tie[:, ::2]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups,n", SHAPES)
def test_gather_rows_is_bit_exact(groups, n, dtype):
    w, _ = _weights(groups, n, dtype)
    table, index, c0 = _table(w, 8)
    rows = _with_rounding_ties(passes.table_rows(table.values, c0, c0 * 1.01, TAU), dtype)
    got = TRITON.gather_rows(w, index[1], rows)
    want = tbl.gather_rows(w, index[0], rows)
    assert got.dtype == dtype and got.shape == w.shape
    assert_ulps("gather", got, want, 0)


def _rows_of(w: torch.Tensor, index: tuple) -> torch.Tensor:
    """(G, N) table row of every point, looked up in the kernels' row map without the passes."""
    return index[1].gather(1, tbl._pattern(w[..., 0])).long()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups,n", SHAPES)
def test_segment_sum_within_rule(groups, n, dtype):
    w, g = _weights(groups, n, dtype)
    table, index, _ = _table(w, 8)
    U = table.values.shape[1]
    got = TRITON.segment_sum(w, g, index[1], U)
    want = tbl.segment_sum(w, g, index[0], U)
    ref = torch.zeros(groups, U, dtype=torch.float64, device=DEVICE).scatter_add_(1, _rows_of(w, index), g[..., 0].double())
    assert_within_rule("segment sum", got[..., 0], want[..., 0], ref)


def test_segment_sum_takes_an_expanded_gradient():
    w, _ = _weights(2, 999, torch.bfloat16)
    table, index, _ = _table(w, 8)
    g = torch.ones((), dtype=torch.bfloat16, device=DEVICE).expand(2, 999, 1)  # strides 0, as from out.sum()
    got = TRITON.segment_sum(w, g, index[1], table.values.shape[1])
    torch.testing.assert_close(got[..., 0], table.counts, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups,n", SHAPES)
def test_element_grad_within_one_ulp(groups, n, dtype):
    w, g = _weights(groups, n, dtype)
    table, index, _ = _table(w, 8)
    gen = torch.Generator().manual_seed(1)
    # Both terms matter: |dh/dv| reaches ~1e2 at tau = 1e-4; the shared term gets the same scale here.
    jac = (torch.randn(table.counts.shape, generator=gen) * 50).to(DEVICE)
    shared = (torch.randn(table.values.shape, generator=gen) * 50).to(DEVICE)
    got = TRITON.element_grad(w, g, index[1], jac, shared)
    want = tbl.element_grad(w, g, index[0], jac, shared)
    assert got.dtype == dtype
    assert_ulps("element grad", got, want, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groups,n", SHAPES)
def test_assign_pack_is_bit_exact(groups, n, bits):
    dtype = torch.bfloat16 if bits != 2 else torch.float16
    w, _ = _weights(groups, n, dtype)
    k = 2**bits if bits < 8 else 200  # K < 2**bits leaves codes unused
    c = kmeans_init(w, k, iters=3)
    c[:, :2, 0] = torch.tensor([0.125, 0.375])  # 0.25 (in the data) is an exact tie: the first index wins
    got = assign_codes(w, c, bits, backend="triton")
    want = assign_codes(w, c, bits, backend="torch")
    assert got.shape == (groups, -(-n // 8) * bits) and got.dtype == torch.uint8
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} bytes differ, first at {bad[0].tolist()}"
    codes = unpack_codes(got, bits, n).long()
    dist = (w.float() - c.transpose(1, 2)).square()  # (G, N, K), computed here, not by `nearest`
    assert torch.equal(dist.gather(2, codes.unsqueeze(-1))[..., 0], dist.min(-1).values)
    assert torch.equal(codes, nearest(w, c))


# -------------------------------------------------------------------------------- table


@pytest.mark.parametrize(
    "groups,n,dtype,k,empty",
    [
        (1, 4097, torch.bfloat16, 8, False),
        (1, 4097, torch.float16, 16, False),
        (3, 700, torch.bfloat16, 16, False),
        (3, 700, torch.float16, 8, True),  # a centroid no weight reaches keeps its value
    ],
)
def test_table_forward_within_rule(groups, n, dtype, k, empty):
    w, _ = _weights(groups, n, dtype)
    table, _, c0 = _table(w, k)
    v, counts = table.values, table.counts
    if empty:
        c0[:, -1] = 5.0
    c_k, d_k = TRITON.table_iterate(v, counts, c0, TAU, 3)
    c_t, d_t = passes.table_iterate(v, counts, c0, TAU, 3)
    c_r, d_r = passes.table_iterate(*_to64(v, counts, c0), TAU, 3)
    assert_within_rule("centroids", c_k, c_t, c_r)
    assert_within_rule("denominators", d_k, d_t, d_r)
    c_prev, c_last = c_r[:, -2].float(), c_r[:, -1].float()
    rows_k = TRITON.table_rows(v, c_prev, c_last, TAU)
    rows_t = passes.table_rows(v, c_prev, c_last, TAU)
    rows_r = passes.table_rows(*_to64(v, c_prev, c_last), TAU)
    assert_within_rule("row values", rows_k, rows_t, rows_r)


def _bwd_inputs(groups, n, dtype, k, iters, empty=False):
    w, g = _weights(groups, n, dtype)
    table, index, c0 = _table(w, k)
    if empty:
        c0[:, -1] = 5.0  # no weight is near: its softmax weight underflows to 0, den = 0
    c_hist, den_hist = passes.table_iterate(*_to64(table.values, table.counts, c0), TAU, iters)
    seg = tbl.segment_sum(w, g, index[0], table.values.shape[1])
    return table.values, table.counts, seg, c_hist.float(), den_hist.float()


@pytest.mark.parametrize(
    "groups,n,dtype,k,iters,empty",
    [
        (1, 4097, torch.bfloat16, 8, 3, False),
        (1, 4097, torch.float16, 16, 3, False),
        (3, 700, torch.bfloat16, 16, 1, False),  # one iteration: the per-iteration step alone
        (3, 700, torch.float16, 8, 2, True),  # an empty centroid (den = 0) must not give 0 / 0
    ],
)
def test_table_backward_matches_autograd_within_rule(groups, n, dtype, k, iters, empty):
    v, counts, seg, c_hist, den_hist = _bwd_inputs(groups, n, dtype, k, iters, empty)
    if empty:
        assert (den_hist[:, :, -1] == 0).all()
    jac_k, sh_k = TRITON.table_bwd(v, counts, seg, c_hist, den_hist, TAU)
    jac_t, sh_t = passes.table_bwd(v, counts, seg, c_hist, den_hist, TAU)
    jac_r, sh_r = passes.table_bwd(*_to64(v, counts, seg, c_hist, den_hist), TAU)
    assert_within_rule("jacobian", jac_k, jac_t, jac_r)
    assert_within_rule("shared gradient", sh_k, sh_t, sh_r)


# ------------------------------------------------------------------------- whole DKM


def _run(w, g, c0, **kw):
    x = w.clone().requires_grad_(True)
    out, c = dkm(x, c0, tau=TAU, max_iters=kw.pop("max_iters", 3), **kw)
    out.backward(g)
    return {"out": out.detach(), "centroids": c, "grad": x.grad}


@pytest.mark.parametrize(
    "n,groups,dtype,bits",
    [
        (1000, None, torch.bfloat16, 3),
        (4097, None, torch.float16, 4),
        (700, 3, torch.bfloat16, 4),  # grouped LUTs, one launch over all groups
        (700, 3, torch.float16, 3),
    ],
)
def test_dkm_triton_matches_torch_and_naive(n, groups, dtype, bits):
    w, g = _weights(groups or 1, n, dtype)  # (G, N, 1)
    c0 = kmeans_init(w, 2**bits, iters=5)
    if groups is None:
        w, g, c0 = w[0], g[0], c0[0]
    ref = _run(w.double(), g.double(), c0.double(), uniquify=False)
    torch_ = _run(w, g, c0, backend="torch")
    triton_ = _run(w, g, c0, backend="triton")
    for key in ("out", "centroids", "grad"):
        assert_within_rule(f"dkm {key}", triton_[key], torch_[key], ref[key])
    assert triton_["out"].dtype == dtype and triton_["grad"].dtype == dtype
    # The 16-bit output is one cast of fp32 row values that differ only by fp32 rounding.
    # (The gradient is not held to 1 ulp here: it is G_i J + r, whose fp32 terms come from
    # two different table backwards and cancel to ~1e-4 of their size on some elements;
    # the element-gradient kernel itself is held to 1 ulp on equal inputs above.)
    assert_ulps("dkm out", triton_["out"], torch_["out"], 1)


def _sum_backward(w, c0, eps, backend):
    x = w.clone().requires_grad_(True)
    out, c = dkm(x, c0, tau=TAU, max_iters=4, eps=eps, backend=backend)
    out.float().sum().backward()  # upstream gradient with stride 0
    return c, x.grad


def test_dkm_triton_rebuild_and_cast_change_no_bit():
    """The Triton ops in rebuild mode with an fp32 weight cast to bf16 inside `dkm`: the same
    bits as casting outside and holding the table."""
    w, g = _weights(3, 700, torch.bfloat16)
    c0 = kmeans_init(w, 8, iters=5)
    w32 = w.float()
    outside = _run(w32.to(torch.bfloat16), g, c0, backend="triton")
    x = w32.clone().requires_grad_(True)
    out, c = dkm(x, c0, tau=TAU, max_iters=3, backend="triton", cast=torch.bfloat16, rebuild=True)
    out.backward(g)
    assert torch.equal(out.detach(), outside["out"]) and torch.equal(c, outside["centroids"])
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, outside["grad"].float())


@pytest.mark.parametrize("eps", [1e9, 0.0])  # 1e9: stop after the first iteration
def test_dkm_triton_stops_early_like_torch_and_takes_expanded_grads(eps):
    w, _ = _weights(1, 1000, torch.bfloat16)
    w = w[0]
    c0 = kmeans_init(w.unsqueeze(0), 8, iters=5)[0]
    c_torch, g_torch = _sum_backward(w, c0, eps, "torch")
    c_triton, g_triton = _sum_backward(w, c0, eps, "triton")
    ref = _run(w.double(), torch.ones_like(w, dtype=torch.float64), c0.double(), uniquify=False, max_iters=4, eps=eps)
    assert_within_rule(f"centroids eps={eps}", c_triton, c_torch, ref["centroids"])
    assert_within_rule(f"grad eps={eps}", g_triton, g_torch, ref["grad"])


def test_deterministic_mode_swaps_the_atomic_segment_sum(monkeypatch):
    from edkm import functional
    from edkm.functional import triton_backend

    torch_sum = triton_backend._torch_segment_sum  # table.segment_sum reading the kernels' row map
    assert triton_ops(deterministic=True).segment_sum is torch_sum
    assert triton_ops().segment_sum is not torch_sum
    w, g = _weights(2, 999, torch.bfloat16)
    table, index, _ = _table(w, 8)
    U = table.values.shape[1]
    assert torch.equal(torch_sum(w, g, index[1], U), tbl.segment_sum(w, g, index[0], U))
    seen = []
    monkeypatch.setattr(functional, "dkm_table", lambda *a, ops, **kw: seen.append(ops) or (a[0], a[1]))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    w = torch.zeros(1, 16, 1, dtype=torch.bfloat16, device=DEVICE)
    dkm(w, torch.zeros(1, 2, 1, device=DEVICE), tau=TAU, max_iters=1, backend="triton")
    assert seen[0].segment_sum is torch_sum


def test_dkm_table_through_triton_ops_equals_dkm_backend_triton():
    w, g = _weights(3, 501, torch.bfloat16)
    c0 = kmeans_init(w, 8, iters=5)
    a = _run(w, g, c0, backend="triton")
    x = w.clone().requires_grad_(True)
    out, c = dkm_table(x, c0, TAU, 3, 0.0, ops=TRITON)
    out.backward(g)
    assert torch.equal(out, a["out"]) and torch.equal(c, a["centroids"]) and torch.equal(x.grad, a["grad"])


# ------------------------------------------------------------------------ backend choice


def test_backend_resolution_and_clear_errors(monkeypatch):
    bf = torch.zeros(1, 10, 1, dtype=torch.bfloat16)
    from edkm import ckernels

    assert resolve_backend("auto", bf) == ("triton" if bf.is_cuda else "c" if ckernels.available() else "torch")
    assert resolve_backend("torch", bf) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", bf)
    with pytest.raises(ValueError, match="float32 with cluster_dim 1"):
        resolve_backend("triton", bf.float())
    with pytest.raises(ValueError, match="cluster_dim 2"):
        resolve_backend("triton", torch.zeros(1, 10, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="uniquify=False"):
        resolve_backend("triton", bf, uniquify=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", bf)


def test_dkm_weight_passes_the_backend_through(monkeypatch):
    import edkm.layers.parametrization as param
    from edkm.config import DKMConfig
    from edkm.layers import DKMWeight

    seen = []
    real = param.dkm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(param, "dkm", spy)
    w = torch.randn(8, 64) * 0.02
    for backend in ("torch", "triton"):
        layer = DKMWeight(w, DKMConfig(bits=3, backend=backend, cluster_dtype="bfloat16"))
        layer(w.clone().requires_grad_(True)).sum().backward()
    assert seen == ["torch", "triton"]
    layer = DKMWeight(w, DKMConfig(bits=3, backend="triton"))
    with pytest.raises(ValueError, match="backend='triton' covers bf16/fp16"):
        layer(w)  # fp32 points: only the torch path covers them


def test_import_edkm_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import torch, edkm\n"
        "from edkm.functional import dkm\n"
        "w = (torch.randn(100, 1) * 0.02).to(torch.bfloat16)\n"
        "c = torch.linspace(-0.05, 0.05, 4).unsqueeze(1)\n"
        "dkm(w, c, tau=1e-4, max_iters=2, backend='auto')\n"
        "try:\n"
        "    dkm(w, c, tau=1e-4, max_iters=2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'needs the triton package' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error without triton')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edkm.kernels import assign, patterns, table_bwd, table_fwd

def signature(fn, types, consts):
    out = {}
    for name in fn.arg_names:
        if name in consts:
            out[name] = "constexpr"
        else:
            out[name] = types.get(name, "*fp32" if name.endswith("_ptr") else "fp32" if name == "tau" else "i32")
    return out

bf, hf = {"points_ptr": "*bf16", "grad_ptr": "*bf16"}, {"points_ptr": "*fp16", "grad_ptr": "*fp16"}
variants = [
    (patterns._scatter_add_kernel, {**bf, "out_ptr": "*i32"}, {"WEIGHTED": False, "BLOCK_N": 1024}),
    (patterns._scatter_add_kernel, {**hf, "rowmap_ptr": "*i32"}, {"WEIGHTED": True, "BLOCK_N": 1024}),
    (patterns._row_gather_kernel, {**bf, "rowmap_ptr": "*i32", "out_ptr": "*bf16"}, {"GRAD": True, "BLOCK_N": 1024}),
    (patterns._row_gather_kernel, {**hf, "rowmap_ptr": "*i32", "out_ptr": "*fp16"}, {"GRAD": False, "BLOCK_N": 1024}),
    (table_fwd._table_iterate_kernel, {}, {"BLOCK_U": 128, "BLOCK_K": 16}),
    (table_fwd._table_rows_kernel, {}, {"BLOCK_U": 256, "BLOCK_K": 8}),
    (table_bwd._table_bwd_kernel, {}, {"BLOCK_U": 128, "BLOCK_K": 16}),
    (assign._assign_pack_kernel, {"points_ptr": "*bf16", "out_ptr": "*u8"}, {"BITS": 3, "BLOCK_R": 128}),
]
for fn, types, consts in variants:
    triton.compile(ASTSource(fn, signature(fn, types, consts), constexprs=consts), target=GPUTarget("cuda", 90, 32))
    print("compiled", fn.__name__, consts)
"""


def test_kernels_compile_for_hopper_without_a_gpu():
    # The interpreter does not compile; this builds every kernel variant to an sm_90 cubin
    # (Triton's bundled ptxas), so GPU-only compile errors fail on a CPU-only CI too.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "No such file" in res.stderr:
        pytest.skip("triton's bundled ptxas is missing")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 8


# ---------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: LLaMA shapes are too slow for the interpreter")
@pytest.mark.parametrize("bits", [3, 4])
def test_llama_shape_on_gpu_within_rule(bits):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(4096, 4096, device="cuda", generator=gen) * 0.02).to(torch.bfloat16).reshape(-1, 1)
    g = torch.randn(w.shape, device="cuda", generator=gen).to(torch.bfloat16)
    c0 = kmeans_init(w.unsqueeze(0), 2**bits, iters=5)[0]
    torch_ = _run(w, g, c0, backend="torch")
    triton_ = _run(w, g, c0, backend="triton")
    # fp64 reference on the table (exact for these inputs: the table path equals naive in fp64)
    ref = _run(w.double(), g.double(), c0.double(), backend="torch")
    for key in ("out", "centroids", "grad"):
        assert_within_rule(f"gpu {key}", triton_[key], torch_[key], ref[key])


def test_min_mass_matches_the_torch_path():
    from edkm.functional.iterations import MIN_MASS
    from edkm.kernels.common import MIN_MASS as KERNEL_MIN_MASS

    assert float(getattr(KERNEL_MIN_MASS, "value", KERNEL_MIN_MASS)) == MIN_MASS
