"""Importance-weighted (sensitivity-aware) DKM and the Fisher importance.

The spec is the naive (N, K) autograd DKM with per-point weights in the centroid sums;
the table path must equal it in fp64 (values and gradients) and stay within the
tolerance rule of test_functional.py in 16-bit dtypes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edkm
from edkm.functional import dkm, kmeans_init
from edkm.hub.models import tiny_llama

TAU = 1e-4


def _data(n, d, groups, dtype, seed=0, zeros=True):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(groups, n, d, generator=gen) * 0.02).to(torch.bfloat16).to(dtype)
    g = torch.randn(groups, n, d, generator=gen).to(dtype)
    s = torch.rand(groups, n, generator=gen, dtype=torch.float64) ** 4 * 3  # skewed, like a Fisher
    if zeros:
        s[:, ::7] = 0.0
    c0 = kmeans_init(w, 8, iters=5)
    return w, g, s, c0


def _run(w, g, c0, s, uniquify, tau=TAU):
    x = w.clone().requires_grad_(True)
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    out, c = dkm(x, c0.to(cdt), tau=tau, max_iters=3, uniquify=uniquify, importance=s)
    out.backward(g)
    return {"out": out.detach().double(), "centroids": c.double(), "grad": x.grad.double()}


def _err(a, ref):
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


CASES = [(1001, 1, 1, torch.bfloat16), (20001, 1, 1, torch.bfloat16), (700, 1, 3, torch.float16),
         (1001, 1, 1, torch.float32), (333, 2, 2, torch.bfloat16)]


@pytest.mark.parametrize("n,d,groups,dtype", CASES)
def test_weighted_table_equals_weighted_naive_fp64(n, d, groups, dtype):
    w, g, s, c0 = _data(n, d, groups, dtype)
    ref = _run(w.double(), g.double(), c0, s, uniquify=False)
    table = _run(w.double(), g.double(), c0, s, uniquify=True)
    for key in ("out", "centroids", "grad"):
        assert _err(table[key], ref[key]) < 1e-10, key


@pytest.mark.parametrize("n,d,groups,dtype", CASES)
def test_weighted_table_within_rule(n, d, groups, dtype):
    w, g, s, c0 = _data(n, d, groups, dtype, seed=3)
    s = s.to(torch.bfloat16)  # modules keep importance in bf16; every path gets the same values
    ref = _run(w.double(), g.double(), c0, s.double(), uniquify=False)
    naive = _run(w, g, c0, s.float(), uniquify=False)
    table = _run(w, g, c0, s, uniquify=True)
    for key in ("out", "centroids", "grad"):
        e_t, e_n = _err(table[key], ref[key]), _err(naive[key], ref[key])
        assert e_t <= 2 * e_n + 1e-5, f"{key}: table {e_t:.3g} vs naive {e_n:.3g}"


def test_weights_change_the_result_and_ones_do_not():
    w, g, s, c0 = _data(1001, 1, 1, torch.float64)
    plain = _run(w, g, c0, None, uniquify=True)
    ones = _run(w, g, c0, torch.ones(1, 1001, dtype=torch.float64), uniquify=True)
    weighted = _run(w, g, c0, s, uniquify=True)
    for key in ("out", "centroids", "grad"):
        assert _err(ones[key], plain[key]) < 1e-12
    assert _err(weighted["centroids"], plain["centroids"]) > 1e-3


def test_naive_weighted_step_matches_hand_computation():
    x = torch.tensor([[[0.0], [1.0], [3.0]]], dtype=torch.float64)
    s = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    c0 = torch.tensor([[[0.5], [2.5]]], dtype=torch.float64)
    tau = 2.0
    _, c = dkm(x, c0, tau=tau, max_iters=1, uniquify=False, importance=s)
    a = torch.softmax(-(x - c0.transpose(1, 2)).square() / tau, -1)[0]  # (3, 2)
    want = (a * s[0, :, None] * x[0]).sum(0) / (a * s[0, :, None]).sum(0)
    torch.testing.assert_close(c[0, :, 0], want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("uniquify", [False, True])
def test_weighted_gradcheck(uniquify):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(12, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    w.data[3] = w.data[7]
    s = torch.rand(12, generator=gen, dtype=torch.float64) + 0.1
    c0 = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    fn = lambda x: dkm(x, c0, tau=0.7, max_iters=3, uniquify=uniquify, importance=s)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w,), eps=1e-6, atol=1e-6)


def test_weighted_kmeans_init_is_the_weighted_mean():
    x = torch.tensor([[[0.0], [1.0], [4.0]]])
    c = kmeans_init(x, 1, iters=3, importance=torch.tensor([[1.0, 1.0, 2.0]]))
    assert abs(c.item() - 9.0 / 4.0) < 1e-6
    assert abs(kmeans_init(x, 1, iters=3).item() - 5.0 / 3.0) < 1e-6


def test_bad_importance_is_an_error():
    w, _, s, c0 = _data(100, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="one entry per point"):
        dkm(w, c0, tau=TAU, max_iters=2, importance=s[:, :50])
    with pytest.raises(ValueError, match=">= 0"):
        dkm(w, c0, tau=TAU, max_iters=2, importance=-s)
    with pytest.raises(ValueError, match="torch or C backend"):
        dkm(w.to(torch.bfloat16), c0, tau=TAU, max_iters=2, importance=s, backend="triton")


def test_fisher_importance_is_the_mean_squared_gradient_and_restores_the_model():
    model = tiny_llama(hidden=32, layers=1, vocab_size=64)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    model.lm_head.weight.requires_grad_(False)  # a frozen flag must survive
    imp = edkm.fisher_importance(model, ids, edkm.DKMConfig(min_weight_numel=0))
    assert sorted(imp) == sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    name = "model.layers.0.mlp.down_proj"
    want = torch.zeros_like(imp[name])
    for i in range(3):
        model.zero_grad()
        model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
        want += model.get_submodule(name).weight.grad.square() / 3
    torch.testing.assert_close(imp[name], want, rtol=1e-5, atol=1e-12)
    model.zero_grad(set_to_none=True)
    edkm.fisher_importance(model, ids)
    assert not model.lm_head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_prepare_with_importance_trains_and_finalizes():
    model = tiny_llama(hidden=32, layers=1, vocab_size=64)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    cfg = edkm.DKMConfig(bits=3, granularity="per_grouped_channel", group_size=8, min_weight_numel=0,
                         cluster_dtype="bfloat16")
    imp = edkm.fisher_importance(model, ids, cfg)
    edkm.prepare(model, cfg, importance=imp)
    layers = list(edkm.clustered_layers(model))
    assert layers and all(p.importance.dtype == torch.bfloat16 for _, _, p in layers)
    for _, _, p in layers:  # mean 1 per LUT group
        torch.testing.assert_close(p.importance.float().mean(1), torch.ones(p.groups), rtol=1e-2, atol=0)
    assert not any(k.endswith("importance") for k in model.state_dict())  # rebuilt from data, not saved
    for name, module, p in layers:  # a training forward uses the weights: equal to functional dkm with them
        points = p.points(module.parametrizations.weight.original.detach())
        want, _ = dkm(points, p.centroids.clone(), tau=cfg.tau, max_iters=cfg.max_iters, importance=p.importance)
        plain, _ = dkm(points, p.centroids.clone(), tau=cfg.tau, max_iters=cfg.max_iters)
        c_before = p.centroids.clone()
        p.train()
        got = p(module.parametrizations.weight.original.detach())
        p.centroids.copy_(c_before)
        torch.testing.assert_close(got, want.reshape(got.shape).to(got.dtype), rtol=0, atol=0)
        assert not torch.equal(want, plain), name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
    edkm.finalize(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, edkm.LUTLinear)


def test_importance_of_wrong_shape_names_the_layer():
    model = tiny_llama(hidden=32, layers=1, vocab_size=64)
    bad = {"model.layers.0.mlp.down_proj": torch.ones(3, 3)}
    with pytest.raises(ValueError, match="down_proj.*importance shape"):
        edkm.prepare(model, edkm.DKMConfig(min_weight_numel=0), importance=bad)


def test_importance_for_a_layer_prepare_skips_is_an_error():
    model = tiny_llama(hidden=32, layers=1, vocab_size=64)
    with pytest.raises(ValueError, match="did not cluster.*module.model"):
        edkm.prepare(model, edkm.DKMConfig(min_weight_numel=0), importance={"module.model.layers.0.mlp.down_proj": None})


def test_fisher_importance_refuses_a_prepared_model():
    model = tiny_llama(hidden=32, layers=1, vocab_size=64)
    edkm.prepare(model, edkm.DKMConfig(min_weight_numel=0))
    with pytest.raises(ValueError, match="before edkm.prepare"):
        edkm.fisher_importance(model, torch.zeros(1, 4, dtype=torch.long))
