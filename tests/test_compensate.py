"""Error-compensated LUT rounding (`edkm.compensate`).

The spec is the optimal-brain-surgeon sweep written out naively in fp64: round one column,
spread its error over the rest with the explicit inverse Hessian, eliminate that column from
the inverse, repeat. The blocked Cholesky form in `compensate_weight` must choose the same
LUT entry for every weight.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import edkm
from edkm.compensate import compensate, compensate_weight, input_hessians
from edkm.hub.models import tiny_llama


def _nearest(w, lut):
    return lut.gather(1, (w[:, :, None] - lut[:, None, :]).abs().argmin(-1))


def _naive_obs(w, lut, H, damp, order):
    """fp64: for j in order: q_j = nearest(w_j); w -= (w_j - q_j) / Hinv_jj * Hinv_j:; Hinv -= ..."""
    W, H = w.double().clone(), H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in order:
        q = _nearest(W[:, j: j + 1], lut.double())[:, 0]
        Q[:, j] = q
        W -= ((W[:, j] - q) / Hinv[j, j])[:, None] * Hinv[j][None, :]
        Hinv -= torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    return Q


def _problem(out=16, n=300, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=gen) * 0.05
    lut = torch.sort(torch.randn(out, k, generator=gen) * 0.05, dim=1).values
    mix = torch.randn(n, n, generator=gen) / n ** 0.5 + torch.eye(n)  # correlated inputs
    x = torch.randn(4 * n, n, generator=gen) @ mix * (torch.rand(n, generator=gen) * 3 + 0.1)
    return w, lut, x, x.T.double() @ x.double() / x.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
def test_equals_the_naive_obs_sweep(act_order):
    w, lut, _, H = _problem()  # 300 columns: three lazy-update blocks of 128
    got = compensate_weight(w, lut, H, damp=0.01, act_order=act_order)
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    want = _naive_obs(w, lut, H, 0.01, order.tolist())
    assert torch.equal(got.double(), want)


@pytest.mark.parametrize("round_dtype", [None, torch.bfloat16])
def test_c_sweep_chooses_what_the_torch_loop_chooses(round_dtype, monkeypatch):
    import importlib

    from edkm import ckernels

    comp = importlib.import_module("edkm.compensate")  # the module (edkm.compensate is also the function)

    if not ckernels.available():
        pytest.skip(f"C kernels unavailable: {ckernels.build_error()}")
    w, lut, _, H = _problem(out=150, n=300, k=16)  # 150 rows: 64-row tasks and a remainder
    w2, lut2, _, H2 = _problem(out=150, n=300, k=16, seed=1)
    W, C, Hs = torch.stack([w, w2]), torch.stack([lut, lut2]), torch.stack([H, H2])
    calls = []
    real = ckernels.c_obs_block
    monkeypatch.setattr(ckernels, "c_obs_block", lambda *a: calls.append(1) or real(*a))
    got = comp._sweep(W, C, Hs, 0.01, True, round_dtype)
    assert len(calls) == 3  # three lazy blocks, all in C
    monkeypatch.setattr(comp, "_c_sweep_applies", lambda *a: False)
    want = comp._sweep(W, C, Hs, 0.01, True, round_dtype)
    assert torch.equal(got, want)


def test_uncorrelated_inputs_give_nearest_rounding():
    w, lut, _, _ = _problem(n=64)
    H = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)  # diagonal: no error to spread
    assert torch.equal(compensate_weight(w, lut, H), _nearest(w, lut))


def test_every_entry_is_its_rows_lut_value_and_the_output_error_falls():
    w, lut, x, H = _problem()
    q = compensate_weight(w, lut, H)
    assert all(bool(torch.isin(q[r], lut[r]).all()) for r in range(w.shape[0]))
    near = _nearest(w, lut)
    err = ((x @ (q - w).T) ** 2).sum()
    err_near = ((x @ (near - w).T) ** 2).sum()
    assert err < 0.7 * err_near, (err, err_near)


def test_round_dtype_decides_on_the_cast_values():
    w, lut, _, _ = _problem(n=32)
    H = torch.eye(32, dtype=torch.float64)
    got = compensate_weight(w, lut, H, round_dtype=torch.bfloat16)
    assert torch.equal(got, _nearest(w.to(torch.bfloat16).float(), lut))


def test_bad_arguments_are_named_errors():
    w, lut, _, H = _problem(n=32)
    with pytest.raises(ValueError, match=r"hessian must be \(32, 32\)"):
        compensate_weight(w, lut, H[:8, :8])
    with pytest.raises(ValueError, match=r"lut must be \(out=16, K\)"):
        compensate_weight(w, lut[:3], H)
    with pytest.raises(ValueError, match="damp must be a finite number >= 0, got -1"):
        compensate_weight(w, lut, H, damp=-1)
    bad = H.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        compensate_weight(w, lut, bad)
    with pytest.raises(ValueError, match="not positive definite after damp=0"):
        compensate_weight(w, lut, -torch.eye(32, dtype=torch.float64) + 2 * torch.ones(32, 32, dtype=torch.float64),
                          damp=0.0)


def _tiny(cluster_dtype="bfloat16", include_embeddings=False):
    model = tiny_llama(hidden=32, layers=2, vocab_size=64)
    ids = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))
    cfg = edkm.DKMConfig(bits=3, granularity="per_grouped_channel", group_size=4, min_weight_numel=0,
                         cluster_dtype=cluster_dtype, include_embeddings=include_embeddings)
    return model, ids, cfg


@pytest.mark.parametrize("cluster_dtype", ["bfloat16", "weight"])
def test_prepared_model_hard_weights_are_the_compensated_ones(cluster_dtype):
    model, ids, cfg = _tiny(cluster_dtype)
    hessians = input_hessians(model, ids, cfg)
    attn = "model.layers.0.self_attn"
    assert hessians[f"{attn}.q_proj"] is hessians[f"{attn}.k_proj"] is hessians[f"{attn}.v_proj"]  # one input
    assert hessians[f"{attn}.q_proj"].dtype == torch.float32
    edkm.prepare(model, cfg)
    before = {n: m.parametrizations.weight.original.detach().clone() for n, m, _ in edkm.clustered_layers(model)}
    done = compensate(model, hessians)
    assert set(done) == set(before)
    model.eval()
    for name, module, _ in edkm.clustered_layers(model):
        master = module.parametrizations.weight.original
        assert torch.equal(module.weight, master), name  # the hard weight is the master weight
        assert not torch.equal(master, before[name]), name
        assert done[name].error < done[name].nearest_error, name
    model(input_ids=ids)  # still a working model


def test_clustered_embeddings_are_left_alone():
    model, ids, cfg = _tiny(include_embeddings=True)
    hessians = input_hessians(model, ids, cfg)
    edkm.prepare(model, cfg)
    emb = model.model.embed_tokens.parametrizations.weight.original.detach().clone()
    done = compensate(model, hessians)
    assert "model.embed_tokens" not in done and "lm_head" not in done and done
    assert torch.equal(model.model.embed_tokens.parametrizations.weight.original, emb)


def test_model_errors_name_the_problem():
    model, ids, cfg = _tiny()
    hessians = input_hessians(model, ids, cfg)
    with pytest.raises(ValueError, match="no clustered layer"):
        compensate(model, hessians)
    edkm.prepare(model, cfg)
    missing = {k: v for k, v in hessians.items() if not k.endswith("down_proj")}
    with pytest.raises(ValueError, match=r"no Hessian for the clustered layer 'model\.layers\.0\.mlp\.down_proj'"):
        compensate(model, missing)
    with pytest.raises(ValueError, match="damp must be a finite number >= 0, got nan"):
        compensate(model, hessians, damp=float("nan"))
    with pytest.raises(ValueError, match=r"windows must be \(n >= 1, L\)"):
        input_hessians(tiny_llama(hidden=32, layers=1, vocab_size=64), ids[0], cfg)
    model2, _, _ = _tiny()
    edkm.prepare(model2, edkm.DKMConfig(bits=2, cluster_dim=2, min_weight_numel=0))
    with pytest.raises(ValueError, match="cluster_dim=2; only 1"):
        compensate(model2, hessians)


def test_layers_sharing_an_input_are_each_their_own_sweep():
    """q / k / v (here at other bits: LUTs of other widths) are swept stacked; each must get
    what `compensate_weight` gives it alone."""
    model, ids, cfg = _tiny("weight")
    cfg = dataclasses.replace(cfg, layers={"*.k_proj": {"bits": 4}, "*.v_proj": {"bits": 2}})
    hessians = input_hessians(model, ids, cfg)
    edkm.prepare(model, cfg)
    want = {}
    for name, module, p in edkm.clustered_layers(model):
        w = module.parametrizations.weight.original.detach()
        lut = p.centroids[:, :, 0].repeat_interleave(w.shape[0] // p.groups, 0)
        want[name] = compensate_weight(w, lut, hessians[name])
    compensate(model, hessians)
    for name, module, _ in edkm.clustered_layers(model):
        assert torch.equal(module.parametrizations.weight.original, want[name]), name
