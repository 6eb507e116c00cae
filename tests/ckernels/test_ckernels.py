"""The C table kernels (`edkm.ckernels`) against their torch twins (`edkm.functional.passes`).

Tolerance: the one rule of tests/tolerance.py. Every fp32 output (centroid history,
denominators, row values, Jacobian, shared gradient) is compared with an fp64 run of the
torch twin on the same inputs; its error may be at most twice the fp32 torch twin's own
error plus 1e-5. End-to-end gradients through `dkm(backend="c")` against the naive spec
are in tests/functional/test_dkm.py; importance-weighted ones in tests/test_importance.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tolerance import assert_within_rule

from edkm import ckernels
from edkm.functional import dkm, kmeans_init, passes
from edkm.functional import table as tbl

TAU = 1e-4
# (groups, table rows, centroids, iterations): SmolLM2's 4-row groups scaled down, one
# per-tensor table, an odd one, 3-bit and 1-centroid LUTs.
SHAPES = [(6, 700, 16, 3), (1, 4097, 8, 3), (3, 333, 5, 1), (2, 65, 1, 2), (4, 17, 16, 4)]

if not ckernels.available():  # pragma: no cover - CI has gcc; a machine without a compiler skips with why
    pytest.skip(f"C table kernels did not build: {ckernels.build_error()}", allow_module_level=True)


def _table(G: int, U: int, K: int, seed: int = 0, importance: bool = False):
    """A real table (distinct bf16 values of LLaMA-like weights, std 0.02) with its
    masses, k-means start centroids and an upstream row gradient."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(G, 3 * U, 1, generator=gen) * 0.02).to(torch.bfloat16)
    w[:, :4, 0] = torch.tensor([0.0, -0.0, 0.25, -0.25])  # a zero row and outliers far from every centroid
    t = tbl.build_table(w)
    mass = t.counts if not importance else t.counts * torch.rand(t.counts.shape, generator=gen) * 2
    c0 = kmeans_init(w, K, iters=3)
    seg = torch.randn(t.values.shape, generator=gen) * (t.counts > 0).unsqueeze(-1)
    return t.values, mass, c0, seg


def _c(x: torch.Tensor) -> torch.Tensor:
    return x[..., 0].contiguous()


@pytest.mark.parametrize("importance", [False, True], ids=["counts", "importance"])
@pytest.mark.parametrize("G,U,K,T", SHAPES)
def test_forward_matches_torch_twin_within_rule(G, U, K, T, importance):
    values, mass, c0, _ = _table(G, U, K, importance=importance)
    ref = passes.table_forward(values.double(), mass.double(), c0.double(), TAU, T)
    twin = passes.table_forward(values, mass, c0, TAU, T)
    got = ckernels.c_table_forward(_c(values), mass, _c(c0), TAU, T)
    for name, g, t, r in zip(("c_hist", "den_hist", "rows"), got, twin, ref):
        assert_within_rule(f"c {name}", g.reshape(t.shape), t, r)
    hist, dens = ckernels.c_table_iterate(_c(values), mass, _c(c0), TAU, T)
    assert torch.equal(hist, got[0]) and torch.equal(dens, got[1])


@pytest.mark.parametrize("importance", [False, True], ids=["counts", "importance"])
@pytest.mark.parametrize("G,U,K,T", SHAPES)
def test_backward_matches_torch_twin_within_rule(G, U, K, T, importance):
    values, mass, c0, seg = _table(G, U, K, seed=1, importance=importance)
    c_hist, den_hist, _ = passes.table_forward(values, mass, c0, TAU, T)
    ref = passes.table_bwd(values.double(), mass.double(), seg.double(), c_hist.double(), den_hist.double(), TAU)
    twin = passes.table_bwd(values, mass, seg, c_hist, den_hist, TAU)
    got = ckernels.c_table_bwd(_c(values), mass, _c(seg), _c(c_hist), den_hist, TAU)
    for name, g, t, r in zip(("jac", "shared"), got, twin, ref):
        assert_within_rule(f"c {name}", g.reshape(t.shape), t, r)


def test_unsorted_and_empty_centroids():
    """The window assumes nothing about centroid order (shuffled centroids: same math), and a
    centroid far from every row (zero mass) keeps its value and passes its gradient through."""
    values, mass, c0, seg = _table(3, 500, 8, seed=2)
    c0 = c0[:, torch.randperm(8, generator=torch.Generator().manual_seed(0))].clone()
    c0[:, 3] = 5.0  # nowhere near the weights: soft mass exactly 0
    T = 3
    ref = passes.table_forward(values.double(), mass.double(), c0.double(), TAU, T)
    twin = passes.table_forward(values, mass, c0, TAU, T)
    got = ckernels.c_table_forward(_c(values), mass, _c(c0), TAU, T)
    for name, g, t, r in zip(("c_hist", "den_hist", "rows"), got, twin, ref):
        assert_within_rule(f"c {name}", g.reshape(t.shape), t, r)
    assert (got[0][:, :, 3] == 5.0).all() and (got[1][:, :, 3] == 0).all()
    bref = passes.table_bwd(values.double(), mass.double(), seg.double(), ref[0], ref[1], TAU)
    btwin = passes.table_bwd(values, mass, seg, twin[0], twin[1], TAU)
    bgot = ckernels.c_table_bwd(_c(values), mass, _c(seg), _c(twin[0]), twin[1], TAU)
    for name, g, t, r in zip(("jac", "shared"), bgot, btwin, bref):
        assert_within_rule(f"c {name}", g.reshape(t.shape), t, r)


def test_threads_change_no_bit():
    """Groups are independent: spreading them over threads gives the same bits as one thread."""
    values, mass, c0, seg = _table(16, 300, 16, seed=3)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ckernels.c_table_forward(_c(values), mass, _c(c0), TAU, 3)
        one_b = ckernels.c_table_bwd(_c(values), mass, _c(seg), one[0], one[1], TAU)
        torch.set_num_threads(2)
        two = ckernels.c_table_forward(_c(values), mass, _c(c0), TAU, 3)
        two_b = ckernels.c_table_bwd(_c(values), mass, _c(seg), two[0], two[1], TAU)
    finally:
        torch.set_num_threads(old)
    for a, b in zip((*one, *one_b), (*two, *two_b)):
        assert torch.equal(a, b)


def test_kept_scratch_carries_nothing_between_calls():
    """Each thread keeps its work buffers between calls (scratch.h): a call after a larger
    one, after one past the keep limit (a 256-centroid table of 16k rows: 16 MB of map),
    and the same call again give the bits of the first run."""
    small = _table(3, 400, 16, seed=5)
    big = _table(1, 16384, 256, seed=6)
    pts_small, _ = _points(3, 2304, torch.bfloat16)
    pts_big, _ = _points(1, 70001, torch.bfloat16)

    def run(values, mass, c0, seg):
        fwd = ckernels.c_table_forward(_c(values), mass, _c(c0), TAU, 2)
        return (*fwd, *ckernels.c_table_bwd(_c(values), mass, _c(seg), fwd[0], fwd[1], TAU))

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one pool thread: every call below reuses its buffers
        first, first_keys = run(*small), ckernels.c_unique_patterns(_c(pts_small))
        run(*big)
        ckernels.c_unique_patterns(_c(pts_big))
        again, again_keys = run(*small), ckernels.c_unique_patterns(_c(pts_small))
    finally:
        torch.set_num_threads(old)
    for a, b in zip((*first, *first_keys), (*again, *again_keys)):
        assert torch.equal(a, b)
    want = tbl.build_table(pts_small)
    assert torch.equal(again_keys[0], want.keys) and torch.equal(again_keys[1], want.counts)


def test_bad_inputs_name_the_value():
    values, mass, c0, seg = _table(2, 50, 4)
    with pytest.raises(ValueError, match="float64"):
        ckernels.c_table_forward(_c(values).double(), mass, _c(c0), TAU, 2)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        ckernels.c_table_forward(_c(values), mass, torch.zeros(3, 4), TAU, 2)
    with pytest.raises(ValueError, match="K=300"):
        ckernels.c_table_forward(_c(values), mass, torch.zeros(2, 300), TAU, 2)
    with pytest.raises(ValueError, match="n_iters=0"):
        ckernels.c_table_forward(_c(values), mass, _c(c0), TAU, 0)
    with pytest.raises(ValueError, match="contiguous"):
        ckernels.c_table_bwd(_c(values).t().contiguous().t(), mass, _c(seg), torch.zeros(2, 3, 4), torch.ones(2, 2, 4), TAU)
    w = torch.randn(100, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="fp32 math"):
        dkm(w, w[:4].clone(), tau=TAU, max_iters=1, backend="c")
    with pytest.raises(ValueError, match="cluster_dim 2"):
        dkm(torch.randn(100, 2), torch.randn(4, 2), tau=TAU, max_iters=1, backend="c")


def test_missing_compiler_is_a_named_error_and_auto_falls_back(tmp_path):
    """Without a compiler: ``backend='c'`` raises naming the compiler, ``'auto'`` runs torch."""
    code = (
        "import torch\n"
        "from edkm import ckernels\n"
        "from edkm.functional import dkm, resolve_backend\n"
        "w = torch.randn(64, 1).to(torch.bfloat16)\n"
        "assert not ckernels.available() and 'edkm-no-such-cc' in ckernels.build_error()\n"
        "assert resolve_backend('auto', w.unsqueeze(0)) == 'torch'\n"
        "dkm(w, w[:4].float(), tau=1e-4, max_iters=1)\n"
        "try:\n"
        "    dkm(w, w[:4].float(), tau=1e-4, max_iters=1, backend='c')\n"
        "except RuntimeError as e:\n"
        "    assert 'edkm-no-such-cc' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    env = {**os.environ, "CC": "edkm-no-such-cc", "EDKM_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_build_is_cached_per_source_and_cpu(tmp_path):
    """A fresh cache compiles once into ``ckernels/table-<key>.so``; the path names the key."""
    env = {**os.environ, "EDKM_CACHE_DIR": str(tmp_path)}
    code = "from edkm import ckernels; assert ckernels.available(), ckernels.build_error(); print(ckernels.library_path())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    path = done.stdout.strip()
    assert path.startswith(str(tmp_path / "ckernels" / "table-")) and os.path.exists(path)
    assert [p.name for p in (tmp_path / "ckernels").iterdir()] == [os.path.basename(path)]  # no temp files left


# ----------------------------------------------------------------- per-element passes

ELEMENT_SHAPES = [(5, 2304), (1, 70001), (3, 333)]  # SmolLM2 4-row groups, a per-tensor one, odd


def _points(G: int, N: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N, 1) 16-bit LLaMA-like points with edge patterns, and a (G, N, 1) gradient."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(G, N, 1, generator=gen) * 0.02
    w[:, :6, 0] = torch.tensor([0.0, -0.0, 1e-6, -3e-8, 0.25, -0.25])  # zeros, subnormal in fp16, outliers
    g = torch.randn(G, N, 1, generator=gen)
    g[:, 1] = 1e-40
    return w.to(dtype), g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,N", ELEMENT_SHAPES)
def test_build_is_the_torch_table_bit_for_bit(G, N, dtype):
    from edkm.functional.c_backend import c_ops

    points, _ = _points(G, N, dtype)
    want, got = tbl.build_table(points), c_ops().build(points)
    for name in ("values", "counts", "keys"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got.bit_pattern


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,N", ELEMENT_SHAPES)
def test_per_element_passes_match_torch_twins(G, N, dtype):
    """Gather: bit-exact (the same cast of the same row). Segment sums: within the rule
    against fp64 (the same point order; the C sum is in fp32 as torch's). Element gradient:
    at most 1 ulp of the 16-bit result (an FMA may round the fp32 value once less)."""
    from tolerance import assert_ulps

    from edkm.functional.c_backend import c_ops

    ops = c_ops()
    points, g = _points(G, N, dtype, seed=4)
    table = tbl.build_table(points)
    U = table.values.shape[1]
    t_index, c_index = table.index(), ops.index(table)
    g16 = g.to(dtype)
    rows = torch.randn(G, U, 1, generator=torch.Generator().manual_seed(5)) * 0.02
    assert torch.equal(ops.gather_rows(points, c_index, rows), tbl.gather_rows(points, t_index, rows))
    for src in (g16, g, torch.rand(G, N, 1)):
        ref = tbl.segment_sum(points, src.double(), t_index, U)
        assert_within_rule("c segment_sum", ops.segment_sum(points, src, c_index, U),
                           tbl.segment_sum(points, src, t_index, U), ref)
    jac, shared = torch.randn(G, U) * 100, torch.randn(G, U, 1)
    scale = torch.rand(G, N) + 0.5
    for s in (None, scale):
        want = tbl.element_grad(points, g16, t_index, jac, shared, s)
        got = ops.element_grad(points, g16, c_index, jac, shared, s)
        assert_ulps("c element_grad", got, want, 1)


def test_per_element_bad_inputs_name_the_value():
    points, g = _points(2, 100, torch.bfloat16)
    keys = tbl.build_table(points).keys
    with pytest.raises(ValueError, match="torch.float32"):
        ckernels.c_unique_patterns(points[..., 0].float())
    with pytest.raises(ValueError, match="int32"):
        ckernels.c_segment_sum(points[..., 0], keys.to(torch.int32), g[..., 0])
    with pytest.raises(ValueError, match=r"\(2, 100\)"):
        ckernels.c_segment_sum(points[..., 0], keys, g[:, :50, 0].contiguous())
    with pytest.raises(ValueError, match="rows"):
        ckernels.c_gather_rows(points[..., 0], keys, torch.zeros(2, keys.shape[1] + 1))


def test_element_grad_rounds_to_bf16_as_torch_casts():
    """The kernel's bf16 output is its fp32 output rounded to nearest even, bit for bit
    (halfway cases, NaN kept a NaN), with a bf16 importance scale read exactly."""
    points, g = _points(3, 999, torch.bfloat16, seed=6)
    keys = tbl.build_table(points).keys
    U = keys.shape[1]
    jac, shared = torch.randn(3, U) * 100, torch.randn(3, U)
    jac[0, 0] = float("nan")
    scale = (torch.rand(3, 999) + 0.5).to(torch.bfloat16)
    g16 = g[..., 0].to(torch.bfloat16)
    f32 = ckernels.c_element_grad(points[..., 0], keys, g16, jac, shared, scale)
    b16 = ckernels.c_element_grad(points[..., 0], keys, g16, jac, shared, scale, out_dtype=torch.bfloat16)
    assert b16.dtype == torch.bfloat16 and torch.equal(b16.isnan(), f32.isnan()) and f32.isnan().any()
    ok = ~f32.isnan()
    assert torch.equal(b16[ok], f32[ok].to(torch.bfloat16))
    f32_scale = ckernels.c_element_grad(points[..., 0], keys, g16, jac, shared, scale.float())
    assert torch.equal(f32.nan_to_num(7.0), f32_scale.nan_to_num(7.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_non_finite_weight_is_a_named_error(bad, dtype):
    w = (torch.randn(2, 64, 1) * 0.02).to(dtype)
    w[1, 7, 0] = bad
    with pytest.raises(ValueError, match=f"non-finite weight value \\({bad}\\)"):
        dkm(w, torch.zeros(2, 4, 1), tau=TAU, max_iters=1, backend="c")


def test_compiler_without_march_native_gets_the_portable_build(tmp_path):
    """A compiler that refuses -march=native (some clang builds) still builds the kernels."""
    import shutil

    real = shutil.which("cc") or shutil.which("gcc")
    assert real, "the module-level skip guarantees a compiler here"
    fake = tmp_path / "cc-no-native"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "-march=native" ] && exit 1; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "CC": str(fake), "EDKM_CACHE_DIR": str(tmp_path / "cache")}
    code = "from edkm import ckernels; assert ckernels.available(), ckernels.build_error(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_compiler_without_the_vector_width_flag_keeps_march_native(tmp_path):
    """On x86-64 the first build asks for 512-bit vectors; a compiler that refuses that flag
    gets the -march=native build, not the portable one (the log of its calls says which)."""
    import shutil

    if not ckernels.WIDE_FLAGS:
        pytest.skip("not x86-64: no vector-width flag is asked for")
    real = shutil.which("cc") or shutil.which("gcc")
    assert real, "the module-level skip guarantees a compiler here"
    calls = tmp_path / "calls"
    fake = tmp_path / "cc-no-wide"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                    f'for a in "$@"; do [ "$a" = "{ckernels.WIDE_FLAGS[0]}" ] && exit 1; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "CC": str(fake), "EDKM_CACHE_DIR": str(tmp_path / "cache")}
    code = "from edkm import ckernels; assert ckernels.available(), ckernels.build_error(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    lines = calls.read_text().splitlines()
    assert len(lines) == 2, lines
    assert ckernels.WIDE_FLAGS[0] in lines[0].split()
    assert "-march=native" in lines[1].split() and ckernels.WIDE_FLAGS[0] not in lines[1].split()


@pytest.mark.parametrize("K", [1, 3, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_c_nearest_is_the_first_argmin(K, dtype):
    from edkm.functional.iterations import sq_dist

    gen = torch.Generator().manual_seed(K)
    c = torch.randn(5, K, generator=gen) * 0.02
    if K > 2:
        c[0, K - 1] = c[0, 1]  # equal centroids: the first wins
    x = (torch.randn(5, 131, generator=gen) * 0.03).to(dtype)  # not a multiple of the 64-point block
    x[:, :K] = c[:, :131].to(dtype)
    want = sq_dist(x.float().unsqueeze(-1), c.unsqueeze(-1)).argmin(-1)
    assert torch.equal(ckernels.c_nearest(x, c), want)


def test_c_nearest_names_bad_arguments():
    with pytest.raises(ValueError, match="1 <= K <= 256"):
        ckernels.c_nearest(torch.zeros(2, 4), torch.zeros(2, 257))
    with pytest.raises(ValueError, match="centroids: want a contiguous float32"):
        ckernels.c_nearest(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.float64))
