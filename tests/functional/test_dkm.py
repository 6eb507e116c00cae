"""Functional DKM: the table path against the naive (N, K) autograd spec.

References run the naive path in fp64 on the same values. Tolerance rule (STYLE.md): the
table path's error against the fp64 reference may be at most twice the naive path's own
error in the same input dtype, plus a small atol. In fp64 both paths must agree to ~1e-10
(this is the test of the backward trap in DESIGN section 2).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerance import assert_equal_fp64, assert_within_rule

from edkm import ckernels
from edkm.functional import dkm, kmeans_init

TAU = 1e-4


def _data(n, d, groups, dtype, distinct=None, seed=0):
    """Weights with many repeated values (bf16-representable), upstream grad, centroids."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, d) if groups is None else (groups, n, d)
    w = torch.randn(shape, generator=gen) * 0.02
    if distinct is not None:
        w = torch.linspace(-0.03, 0.03, distinct)[torch.randint(0, distinct, shape, generator=gen)]
    w = w.to(torch.bfloat16).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    pts = w if groups is not None else w.unsqueeze(0)
    c0 = kmeans_init(pts, 8, iters=5)
    return w, g, c0 if groups is not None else c0[0]


def _run(w, g, c0, uniquify, backend="torch", **kw):
    """Outputs, centroids and gradient of one DKM call; the table path on ``backend``
    (torch by default: these tests are of the torch passes unless they name the C ones)."""
    if backend == "c" and not ckernels.available():  # pragma: no cover - CI has gcc
        pytest.skip(f"C table kernels did not build: {ckernels.build_error()}")
    x = w.clone().requires_grad_(True)
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    out, c = dkm(x, c0.to(cdt), tau=kw.get("tau", TAU), max_iters=kw.get("max_iters", 3), eps=kw.get("eps", 0.0),
                 uniquify=uniquify, backend=backend if uniquify else "torch")
    out.backward(g)
    return {"out": out.detach().double(), "centroids": c.double(), "grad": x.grad.double()}


CASES = [
    # (n, d, groups, dtype, distinct)
    (1001, 1, None, torch.bfloat16, None),  # bit-pattern path, odd N
    (20001, 1, None, torch.bfloat16, None),  # bit-pattern path, a larger table
    (16500, 1, 2, torch.float16, None),  # grouped
    (1001, 1, None, torch.float16, None),
    (1001, 1, None, torch.float32, None),  # torch.unique path
    (513, 3, None, torch.bfloat16, None),  # d > 1
    (513, 2, None, torch.float32, None),
    (700, 1, 3, torch.bfloat16, None),  # grouped LUTs
    (333, 2, 4, torch.float16, None),
    (999, 1, None, torch.bfloat16, 3),  # fewer distinct values than K = 8
    (257, 2, 2, torch.float32, 5),
]


# The C table kernels (edkm.ckernels) cover d = 1 with fp32 math: every such case runs on both.
BACKEND_CASES = [(*case, "torch") for case in CASES] + [(*case, "c") for case in CASES if case[1] == 1]


@pytest.mark.parametrize("n,d,groups,dtype,distinct,backend", BACKEND_CASES)
def test_table_matches_naive_within_rule(n, d, groups, dtype, distinct, backend):
    w, g, c0 = _data(n, d, groups, dtype, distinct)
    ref = _run(w.double(), g.double(), c0, uniquify=False)
    naive = _run(w, g, c0, uniquify=False)
    table = _run(w, g, c0, uniquify=True, backend=backend)
    for key in ("out", "centroids", "grad"):
        assert_within_rule(f"table ({backend}) {key} vs naive", table[key], naive[key], ref[key])


@pytest.mark.parametrize("n,d,groups,dtype,distinct", CASES)
def test_table_equals_naive_in_fp64(n, d, groups, dtype, distinct):
    w, g, c0 = _data(n, d, groups, dtype, distinct)
    ref = _run(w.double(), g.double(), c0, uniquify=False)
    table = _run(w.double(), g.double(), c0, uniquify=True)
    for key in ("out", "centroids", "grad"):
        assert_equal_fp64(f"table {key}", table[key], ref[key])


def test_gradient_is_per_element_not_averaged():
    # Two equal weights with different upstream gradients must get different gradients
    # (the "average over equal values" mistake gives them the same one).
    w = torch.tensor([[0.01], [0.01], [0.02], [-0.01], [0.0]], dtype=torch.float64)
    g = torch.tensor([[1.0], [-3.0], [0.5], [2.0], [1.0]], dtype=torch.float64)
    c0 = torch.tensor([[-0.012], [0.004], [0.018]], dtype=torch.float64)
    ref = _run(w, g, c0, uniquify=False, tau=1e-4)
    table = _run(w, g, c0, uniquify=True, tau=1e-4)
    assert not torch.allclose(ref["grad"][0], ref["grad"][1])
    torch.testing.assert_close(table["grad"], ref["grad"], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("uniquify", [False, True])
def test_gradcheck_against_finite_differences(uniquify):
    # A smooth temperature so finite differences are meaningful; fp64 throughout.
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(12, 2, generator=gen, dtype=torch.float64)).requires_grad_(True)
    w.data[3] = w.data[7]  # a repeated value
    c0 = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    fn = lambda x: dkm(x, c0, tau=0.7, max_iters=3, uniquify=uniquify)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w,), eps=1e-6, atol=1e-6)


def test_naive_matches_hand_computation():
    # One iteration on 3 points, 2 centroids, written out by hand.
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    c0 = torch.tensor([[0.5], [2.5]], dtype=torch.float64)
    tau = 2.0
    a = torch.tensor([[math.exp(-((xi - c) ** 2) / tau) for c in (0.5, 2.5)] for xi in (0.0, 1.0, 3.0)], dtype=torch.float64)
    a = a / a.sum(1, keepdim=True)
    c1 = (a.T @ x) / a.sum(0).unsqueeze(1)
    out, c = dkm(x, c0, tau=tau, max_iters=1, uniquify=False)
    torch.testing.assert_close(c, c1)
    torch.testing.assert_close(out, a @ c1)


@pytest.mark.parametrize("uniquify", [False, True])
def test_eps_stops_early_and_zero_runs_all(uniquify):
    w, g, c0 = _data(301, 1, None, torch.float32)
    _, c_one = dkm(w, c0, tau=TAU, max_iters=1, uniquify=uniquify)
    _, c_eps = dkm(w, c0, tau=TAU, max_iters=5, eps=1e9, uniquify=uniquify)
    _, c_all = dkm(w, c0, tau=TAU, max_iters=5, eps=0.0, uniquify=uniquify)
    torch.testing.assert_close(c_eps, c_one, rtol=0, atol=0)
    c = c0
    for _ in range(5):  # eps = 0 runs all 5 iterations: the same as 5 chained single iterations
        _, c = dkm(w, c, tau=TAU, max_iters=1, uniquify=uniquify)
    torch.testing.assert_close(c_all, c, rtol=0, atol=0)
    assert not torch.equal(c_all, c_one)


def test_centroids_get_no_gradient_and_output_dtype():
    w, g, c0 = _data(200, 1, None, torch.bfloat16)
    c = c0.clone().requires_grad_(True)
    out, new_c = dkm(w.clone().requires_grad_(True), c, tau=TAU, max_iters=2)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert not new_c.requires_grad
    out.float().sum().backward()
    assert c.grad is None


@pytest.mark.parametrize("uniquify", [False, True])
def test_bad_inputs_name_the_value(uniquify):
    c0 = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="nan|NaN|non-finite"):
        dkm(torch.tensor([[0.1], [float("nan")]]), c0, tau=TAU, max_iters=1, uniquify=uniquify)
    with pytest.raises(ValueError, match="empty"):
        dkm(torch.zeros(0, 1), c0, tau=TAU, max_iters=1, uniquify=uniquify)
    with pytest.raises(ValueError, match="tau.*-1"):
        dkm(torch.zeros(3, 1), c0, tau=-1.0, max_iters=1, uniquify=uniquify)
    with pytest.raises(ValueError, match="max_iters.*0"):
        dkm(torch.zeros(3, 1), c0, tau=TAU, max_iters=0, uniquify=uniquify)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        dkm(torch.zeros(3, 1), torch.zeros(4, 2), tau=TAU, max_iters=1, uniquify=uniquify)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 9),
    d=st.integers(1, 2),
    distinct=st.integers(1, 40),
    iters=st.integers(1, 4),
    log_tau=st.floats(-5, 0),
    seed=st.integers(0, 2**16),
)
def test_property_table_equals_naive_fp64(n, k, d, distinct, iters, log_tau, seed):
    gen = torch.Generator().manual_seed(seed)
    vals = torch.randn(distinct, d, generator=gen, dtype=torch.float64) * 0.05
    w = vals[torch.randint(0, distinct, (n,), generator=gen)]
    g = torch.randn(n, d, generator=gen, dtype=torch.float64)
    c0 = torch.randn(k, d, generator=gen, dtype=torch.float64) * 0.05
    kw = {"tau": 10.0**log_tau, "max_iters": iters}
    ref = _run(w, g, c0, uniquify=False, **kw)
    table = _run(w, g, c0, uniquify=True, **kw)
    for key in ("out", "centroids", "grad"):
        assert_equal_fp64(f"table {key}", table[key], ref[key], tol=1e-9)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 2000), k=st.sampled_from([2, 8, 16]), seed=st.integers(0, 2**16), half=st.booleans(),
       backend=st.sampled_from(["torch", "c"]))
def test_property_bit_pattern_path_within_rule(n, k, seed, half, backend):
    dtype = torch.float16 if half else torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, 1, generator=gen) * 0.02).to(dtype)
    g = torch.randn(n, 1, generator=gen).to(dtype)
    c0 = kmeans_init(w.unsqueeze(0), k, iters=3)[0]
    ref = _run(w.double(), g.double(), c0, uniquify=False)
    naive = _run(w, g, c0, uniquify=False)
    table = _run(w, g, c0, uniquify=True, backend=backend)
    for key in ("out", "grad"):
        assert_within_rule(f"table ({backend}) {key} vs naive", table[key], naive[key], ref[key])


def test_kmeans_init_fills_lut_and_is_deterministic():
    w = torch.tensor([[0.1], [0.1], [0.2]])
    c = kmeans_init(w.unsqueeze(0), 4)
    assert c.shape == (1, 4, 1)
    assert sorted({round(v, 6) for v in c.flatten().tolist()}) == [0.1, 0.2]
    x = torch.randn(1, 500, 2)
    torch.testing.assert_close(kmeans_init(x, 8, seed=3), kmeans_init(x, 8, seed=3))


@pytest.mark.parametrize("uniquify,backend", [(False, "torch"), (True, "torch"), (True, "c")])
def test_centroid_with_denormal_mass_gives_finite_gradients(uniquify, backend):
    # Centroid 2 sits 0.0095 from the weights at 0: its soft weight exp(-0.0095^2/1e-4)
    # ~ 5e-42 is a denormal. Dividing by that mass overflowed 1/mass^2 to inf -> NaN
    # gradients (seen on SmolLM2); such a centroid must count as empty.
    w = torch.tensor([[0.0], [0.0], [1.0], [1.0]], requires_grad=True)
    c0 = torch.tensor([[0.0], [1.0], [0.0975]])
    out, c = dkm(w, c0, tau=1e-4, max_iters=3, uniquify=uniquify, backend=backend)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(w.grad).all() and torch.isfinite(out).all()
    assert c[2, 0].item() == pytest.approx(0.0975)  # kept, not moved by a denormal mass


BIG = 1 << 40


@pytest.mark.parametrize("block,keep", [(1, BIG), (BIG, 0), (1, 0)], ids=["blocks-kept", "one-block-recomputed",
                                                                         "blocks-recomputed"])
@pytest.mark.parametrize("n,d,groups,dtype", [(700, 1, 5, torch.bfloat16), (333, 2, 4, torch.float32),
                                               (20001, 1, 2, torch.float16), (333, 2, 4, torch.float64)])
def test_table_blocks_and_recomputed_maps_change_nothing(monkeypatch, n, d, groups, dtype, block, keep):
    """One group per block and/or maps recomputed instead of kept, against one block
    holding every group with its maps kept: the same bits for d = 1 (elementwise ops and
    reductions along U only); for d > 1 the einsums may order their sums differently by
    batch size, so there the rule against the naive fp64 path holds (and fp64 equality
    in fp64)."""
    from edkm.functional import passes

    w, g, c0 = _data(n, d, groups, dtype)
    monkeypatch.setattr(passes, "TABLE_BLOCK", BIG)
    monkeypatch.setattr(passes, "KEEP_MAPS", BIG)
    assert len(passes._group_blocks(groups, n, 8, d)) == 1 and passes._keeps_maps(groups, n, 8, d)
    want = _run(w, g, c0, uniquify=True)
    monkeypatch.setattr(passes, "TABLE_BLOCK", block)
    monkeypatch.setattr(passes, "KEEP_MAPS", keep)
    assert len(passes._group_blocks(groups, n, 8, d)) == (groups if block == 1 else 1)
    assert passes._keeps_maps(groups, 1, 1, 1) == (keep == BIG)
    got = _run(w, g, c0, uniquify=True)
    if d == 1:
        for key in want:
            assert torch.equal(got[key], want[key]), key
        return
    ref = _run(w.double(), g.double(), c0, uniquify=False)
    naive = _run(w, g, c0, uniquify=False)
    for key in want:
        if dtype == torch.float64:
            assert_equal_fp64(f"blocked {key}", got[key], ref[key])
        else:
            assert_within_rule(f"blocked {key} vs naive", got[key], naive[key], ref[key])


@pytest.mark.parametrize("importance", [False, True])
def test_rebuild_holds_only_the_centroid_history_and_changes_no_bit(importance):
    """``rebuild=True`` with ``cast``: the same outputs, centroids and gradients as
    casting outside and holding the table, while backward holds only the centroid
    history (the fp32 weight is a parameter, resident anyway)."""
    from edkm import offload_saved_tensors

    groups, n, k, T = 4, 3000, 8, 3
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(groups, n, 1, generator=gen) * 0.02
    g = torch.randn(groups, n, 1, generator=gen).to(torch.bfloat16)
    imp = torch.rand(groups, n, generator=gen) if importance else None
    c0 = kmeans_init(w.to(torch.bfloat16), k, iters=5)
    runs = {}
    for mode in ("outside", "inside", "rebuild"):
        x = torch.nn.Parameter(w.clone())
        pts, cast = (x.to(torch.bfloat16), None) if mode == "outside" else (x, torch.bfloat16)
        with offload_saved_tensors(device="cpu", min_bytes=1 << 62) as stats:
            out, c = dkm(pts, c0, tau=TAU, max_iters=T, cast=cast, rebuild=mode == "rebuild", importance=imp)
        held = stats.to_dict()["bytes_held"].get("cpu", 0)
        out.float().backward(g.float())
        runs[mode] = (out.detach(), c, x.grad, held)
    for mode in ("inside", "rebuild"):
        for a, b in zip(runs[mode][:3], runs["outside"][:3]):
            assert a.dtype == b.dtype and torch.equal(a, b), mode
    history = groups * (T + 1) * k * 4 + groups * T * k * 4  # c_hist and den_hist, fp32
    assert runs["rebuild"][3] <= history, runs["rebuild"][3]
    assert runs["inside"][3] >= n * groups * 2 + history  # the bf16 cast and the table besides


def test_rebuild_and_cast_errors_name_the_value():
    from edkm import DKMConfig

    w, g, c0 = _data(500, 1, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="uniquify=True"):
        dkm(w, c0, tau=TAU, max_iters=2, uniquify=False, rebuild=True)
    with pytest.raises(ValueError, match="torch.int16"):
        dkm(w, c0, tau=TAU, max_iters=2, cast=torch.int16)
    with pytest.raises(ValueError, match="uniquify=False"):
        DKMConfig(rebuild=True, uniquify=False)
    with pytest.raises(ValueError, match="shard=True"):
        DKMConfig(rebuild=True, shard=True)
