"""LoRD (edkm.lowrank): optimality, grouped sharing, validation, model pass, DKM composition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import edkm
from edkm.hub.models import tiny_llama
from edkm.layers import LUTLinear
from edkm.lowrank import (
    LowRankConfig,
    LowRankLinear,
    SecondMoment,
    allocate_ranks,
    causal_lm_loss,
    collect_input_stats,
    decompose_group,
    decompose_linear,
    factorize,
    lowrank_model,
    parity_rank,
)

F64 = torch.float64


def anisotropic_inputs(n: int, d: int, decades: float = 4.0, seed: int = 0) -> torch.Tensor:
    """(n, d) inputs whose covariance has eigenvalues spread over ``decades`` decades, random basis."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    scales = torch.logspace(0, -decades / 2, d, dtype=F64)  # std; variance spans `decades`
    return (torch.randn(n, d, generator=g, dtype=F64) * scales) @ basis.T + 0.1  # nonzero mean too


def linear(out_f: int, in_f: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(F64)


def out_error(ref: nn.Module, new: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = ref(x)
        centred = y - (ref.bias if ref.bias is not None else 0)
        return float((new(x) - y).square().sum() / centred.square().sum())


def tokens(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("damping", [0.0, 1e-2], ids=["undamped", "default-damping"])
def test_activation_aware_beats_plain_svd_at_every_rank(damping):
    lin = linear(48, 40)
    x = anisotropic_inputs(4000, 40)
    w = lin.weight.detach()
    y = x @ w.T  # (n, out) outputs without the bias

    def error(fact, rank):  # relative output error of the rank-r factors on x
        b, a = fact.factors(rank)
        return float((x @ (w - b @ a).T).square().sum() / y.square().sum())

    aware = factorize(w, SecondMoment.from_inputs(x), damping=damping)
    plain = factorize(w, None, activation_aware=False)
    for rank in range(1, math.ceil(parity_rank(48, 40))):  # every rank below parity (21.8)
        aa, svd = error(aware, rank), error(plain, rank)
        assert aa < svd, f"rank {rank}: activation-aware {aa:.3e} >= plain SVD {svd:.3e}"
        if rank == 8:  # the gap is large, not a rounding accident
            assert aa < 0.5 * svd, (aa, svd)
    # The modules decompose_linear builds give the same errors.
    assert out_error(lin, decompose_linear(lin, x, 8, damping=damping), x) == pytest.approx(error(aware, 8), rel=1e-9)
    assert out_error(lin, decompose_linear(lin, x, 8, activation_aware=False), x) == pytest.approx(
        error(plain, 8), rel=1e-9
    )


def test_output_error_equals_spectrum_tail():
    """Eckart-Young in the S metric: measured output error = sum of the dropped s_i^2."""
    lin = linear(30, 24)
    x = anisotropic_inputs(3000, 24, seed=1)
    fact = factorize(lin.weight, SecondMoment.from_inputs(x), damping=0.0)
    tail = fact.tail_fraction()
    plain = factorize(lin.weight, None, activation_aware=False).tail_fraction()
    w_norm = lin.weight.detach().square().sum()
    for rank in (1, 5, 12):
        got = out_error(lin, decompose_linear(lin, x, rank, damping=0.0), x)
        assert got == pytest.approx(float(tail[rank]), rel=1e-8)
        svd = decompose_linear(lin, x, rank, activation_aware=False)
        frob = float((svd.dense_weight() - lin.weight).detach().square().sum() / w_norm)
        assert frob == pytest.approx(float(plain[rank]), rel=1e-8)


@pytest.mark.parametrize("shape", [(30, 24), (20, 36)], ids=["out>=in", "out<in"])
def test_factors_are_exact_at_full_rank_and_whitened(shape):
    """B A = W at full rank, and A S_d A^T = I: the bottleneck outputs are whitened."""
    out_f, in_f = shape
    w = torch.randn(out_f, in_f, dtype=F64, generator=torch.Generator().manual_seed(2))
    moment = SecondMoment.from_inputs(anisotropic_inputs(2000, in_f, decades=3.0))
    fact = factorize(w, moment, damping=1e-2)
    b, a = fact.factors(min(shape))
    torch.testing.assert_close(b @ a, w, rtol=1e-9, atol=1e-9)
    s_mat = moment.matrix()
    s_d = s_mat + 1e-2 * s_mat.diagonal().mean() * torch.eye(in_f, dtype=F64)
    torch.testing.assert_close(a @ s_d @ a.T, torch.eye(min(shape), dtype=F64), rtol=0, atol=1e-9)
    assert torch.all(fact.s[:-1] >= fact.s[1:])


def test_rank_deficient_inputs_use_eigh_fallback():
    lin = linear(20, 16)
    x = anisotropic_inputs(500, 16)[:, :10] @ torch.randn(10, 16, dtype=F64)  # inputs span 10 dims
    moment = SecondMoment.from_inputs(x)
    assert torch.linalg.cholesky_ex(moment.matrix())[1] > 0  # Cholesky really fails undamped
    fact = factorize(lin.weight, moment, damping=0.0)
    assert torch.isfinite(fact.a).all()
    # The inputs live in 10 dims, so rank 10 reproduces every calibration output.
    got = out_error(lin, decompose_linear(lin, moment, 8, damping=0.0), x)
    assert got == pytest.approx(float(fact.tail_fraction()[8]), rel=1e-6)
    assert float(fact.tail_fraction()[10]) < 1e-9  # only the 1e-12 eigenvalue clamp is left


# ----------------------------------------------------------------------------- grouping


def qkv(seed: int = 0) -> list[nn.Linear]:
    return [linear(64, 64, seed=seed), linear(32, 64, seed=seed + 1), linear(32, 64, seed=seed + 2)]


def test_grouped_sharing_exact_at_full_rank():
    layers = qkv()
    x = anisotropic_inputs(1000, 64, decades=2.0)
    with pytest.warns(UserWarning, match=r"rank 64 .* parity point r = 128\*64/\(128\+64\) = 42.67"):
        new = decompose_group(layers, x, 64, allow_beyond_parity=True)
    assert new[1].down is new[0].down and new[2].down is new[0].down
    with torch.no_grad():
        for ref, mod in zip(layers, new):
            torch.testing.assert_close(mod(x), ref(x), rtol=1e-10, atol=1e-10)


def test_grouped_equals_decomposing_the_stacked_layer():
    layers = qkv(seed=3)
    x = anisotropic_inputs(2000, 64)
    stacked = nn.Linear(64, 128).to(F64)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([lin.weight for lin in layers]))
        stacked.bias.copy_(torch.cat([lin.bias for lin in layers]))
    group = decompose_group(layers, x, 20)
    single = decompose_linear(stacked, x, 20)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([m(x) for m in group], -1), single(x), rtol=1e-9, atol=1e-9)
    assert sum(p.numel() for m in group for p in m.parameters()) == sum(p.numel() for p in single.parameters())


def test_shared_bottleneck_runs_once_with_exact_gradients():
    layers = qkv()
    x = anisotropic_inputs(64, 64)
    new = decompose_group(layers, x, 16)
    calls = []
    new[0].down.register_forward_hook(lambda *a: calls.append(1))
    xs = x.clone().requires_grad_(True)
    loss = sum((m(xs) * (i + 1)).sum() for i, m in enumerate(new))
    loss.backward()
    assert len(calls) == 1
    grad_cached, grad_x = new[0].down.weight.grad.clone(), xs.grad.clone()
    new[0].down.weight.grad = None
    xs.grad = None
    ref = sum((m.up(new[0].down(xs)) * (i + 1)).sum() for i, m in enumerate(new))  # no cache
    ref.backward()
    torch.testing.assert_close(grad_cached, new[0].down.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, xs.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # an in-place change to the input invalidates the cache
        before = new[1](x)
        x.mul_(2)
        torch.testing.assert_close(new[1](x), 2 * before - new[1].up.bias, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "rank, pattern",
    [
        (0, r"must be in \[1, min\(out, in\)=40\], got 0"),
        (-3, r"got -3"),
        (41, r"must be in \[1, min\(out, in\)=40\], got 41"),
        (22, r"rank 22 .* parity point r = 48\*40/\(48\+40\) = 21.82"),
        (2.5, r"must be an integer, got 2.5"),
    ],
    ids=["zero", "negative", "above-min", "beyond-parity", "float"],
)
def test_bad_rank_errors_name_the_value(rank, pattern):
    lin = linear(48, 40)
    with pytest.raises(ValueError, match=pattern):
        decompose_linear(lin, torch.randn(10, 40, dtype=F64), rank)


def test_rank_at_parity_exactly_is_an_error():
    with pytest.raises(ValueError, match=r"rank 32 .* at or beyond the parity point .* = 32.00"):
        decompose_linear(linear(64, 64), torch.randn(10, 64, dtype=F64), 32)


def test_shape_mismatches_raise():
    lin = linear(48, 40)
    with pytest.raises(ValueError, match=r"shape \(10, 39\) do not match in_features=40"):
        decompose_linear(lin, torch.randn(10, 39, dtype=F64), 4)
    with pytest.raises(ValueError, match=r"same input size.*\(8, 40\).*\(8, 30\)"):
        decompose_group([linear(8, 40), linear(8, 30)], torch.randn(10, 40, dtype=F64), 2, names=["a", "b"])
    with pytest.raises(TypeError, match="must be an nn.Linear, got Conv1d"):
        decompose_linear(nn.Conv1d(4, 4, 1), torch.randn(10, 4), 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        decompose_linear(lin, torch.full((10, 40), float("nan"), dtype=F64), 4)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"rank_reduction": 1.0}, r"rank_reduction must be a fraction in \(0, 1\), got 1.0"),
        ({"rank_reduction": None}, r"exactly one of rank_reduction / budget"),
        ({"budget": 0.3}, r"exactly one of rank_reduction / budget, got rank_reduction=0.25, budget=0.3"),
        ({"rank_reduction": None, "budget": -0.1}, r"budget must be a fraction in \(0, 1\), got -0.1"),
        ({"damping": -1e-3}, r"damping must be a finite number >= 0, got -0.001"),
        ({"rank_multiple": 0}, r"rank_multiple must be an integer >= 1, got 0"),
        ({"groups": "yes"}, r"groups must be a bool, got 'yes'"),
        ({"include": [""]}, r"include must be a non-empty pattern or a list of non-empty patterns, got \[''\]"),
        ({"sensitivity": "hessian"}, r"sensitivity must be one of \('fisher', 'spectrum'\), got 'hessian'"),
    ],
)
def test_config_validation(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        LowRankConfig().replace(**changes)


def test_config_round_trip_and_unknown_key():
    cfg = LowRankConfig(include=["*mlp*"], rank_reduction=None, budget=0.2, rank_multiple=8, groups=False)
    assert LowRankConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["include"] == ["*mlp*"]
    with pytest.raises(ValueError, match=r"unknown LowRankConfig key\(s\) \['rank'\]"):
        LowRankConfig.from_dict({"rank": 4})


# ----------------------------------------------------------------------------- model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lowrank_model_tiny_llama_end_to_end():
    model = tiny_llama(hidden=64, layers=2)
    dense = copy.deepcopy(model)
    calib = [tokens(4, 32, seed) for seed in range(2)]
    before = n_params(model)
    report = lowrank_model(model, calib, LowRankConfig(rank_reduction=0.3))
    # Units: q/k/v and gate/up found as groups through the shared input tensor.
    assert [u.members for u in report.layers[:3]] == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.self_attn.o_proj",),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
    ]
    assert len(report.layers) == 8
    # The report adds up: its totals, and the change in the model's parameter count.
    assert before - n_params(model) == report.params_before - report.params_after
    assert report.params_before == sum(n_params(m) for n, m in dense.named_modules()
                                       if isinstance(m, nn.Linear) and n != "lm_head")
    assert 0.30 <= report.removed_fraction < 0.33
    for u in report.layers:
        assert u.rank < u.parity and u.params_after < u.params_before
        assert 0 < u.rel_error < 1 and set(u.member_errors) == set(u.members)
    text = report.summary()
    assert "model.layers.1.self_attn.{q_proj,k_proj,v_proj}" in text and "removed" in text
    # Report errors are output errors on the calibration data: check layer 0's q/k/v directly.
    seen = []
    hook = dense.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for ids in calib:
            dense(ids)
    hook.remove()
    x = torch.cat([s.reshape(-1, 64) for s in seen]).double()
    attn, new_attn = dense.model.layers[0].self_attn, model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        ref, new = copy.deepcopy(getattr(attn, name)).double(), copy.deepcopy(getattr(new_attn, name)).double()
        if new.shares_down:
            new = LowRankLinear(copy.deepcopy(new_attn.q_proj.down).double(), new.up)
        measured = out_error(ref, new, x)
        assert measured == pytest.approx(report.layers[0].member_errors[f"model.layers.0.self_attn.{name}"], rel=1e-4)
    with torch.no_grad():
        logits, ref_logits = model(calib[0]).logits, dense(calib[0]).logits
    assert torch.isfinite(logits).all()
    assert (logits - ref_logits).norm() < 0.5 * ref_logits.norm()


@pytest.mark.parametrize("sensitivity", ["fisher", "spectrum"])
def test_lowrank_model_budget_and_groups_off(sensitivity):
    model = tiny_llama(hidden=64, layers=2)
    cfg = LowRankConfig(include=["*mlp*"], rank_reduction=None, budget=0.3, sensitivity=sensitivity,
                        groups=False, rank_multiple=4)
    report = lowrank_model(model, [tokens(4, 32, 0)], cfg)
    assert len(report.layers) == 6 and all(len(u.members) == 1 for u in report.layers)
    assert 0.30 <= report.removed_fraction < 0.36, report.removed_fraction
    assert all(u.rank is None or u.rank % 4 == 0 for u in report.layers)
    assert not any(m.shares_down for m in model.modules() if isinstance(m, LowRankLinear))
    assert not any(isinstance(m, LowRankLinear) for m in model.model.layers[0].self_attn.modules())


def test_second_call_never_decomposes_factors():
    model = tiny_llama(hidden=64, layers=1)
    calib = [tokens(2, 16, 0)]
    lowrank_model(model, calib, LowRankConfig(include=["*self_attn*"]))
    q_down = model.model.layers[0].self_attn.q_proj.down
    report = lowrank_model(model, calib, LowRankConfig())  # "*": only the MLP linears are left
    assert {n for u in report.layers for n in u.members} == {
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}
    assert model.model.layers[0].self_attn.q_proj.down is q_down
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        lowrank_model(model, calib, LowRankConfig())


def test_allocate_ranks_prefers_the_cheap_unit():
    flat = torch.ones(32, dtype=F64)  # every direction costs the same
    steep = torch.logspace(0, -6, 32, dtype=F64)  # almost all cost in the first directions
    ranks = allocate_ranks([(32, 32), (32, 32)], [flat, steep], budget=0.25)
    assert ranks[0] is None and ranks[1] is not None and ranks[1] <= 8, ranks
    ranks = allocate_ranks([(32, 32), (32, 32)], [flat, steep], budget=0.25, rank_multiple=4)
    assert ranks[1] % 4 == 0
    with pytest.raises(ValueError, match="budget=0.99 .* largest reducible fraction"):
        allocate_ranks([(32, 32), (32, 32)], [flat, steep], budget=0.99)


def test_gradient_statistics_leave_parameters_alone():
    model = tiny_llama(hidden=64, layers=1)
    model.model.layers[0].mlp.requires_grad_(False)  # a partly frozen model
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    stats = collect_input_stats(model, [tokens(2, 16, 0)], names, loss_fn=causal_lm_loss)
    assert set(stats.grads) == set(names)
    for n in names:
        out_f = model.get_submodule(n).out_features
        assert stats.grads[n].sum.shape == (out_f, out_f) and stats.grads[n].count == 32
        assert float(stats.grads[n].sum.trace()) > 0
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.model.layers[0].mlp.parameters())
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad
    # Fisher budget on precomputed statistics without gradients is refused, by name.
    plain = collect_input_stats(model, [tokens(2, 16, 0)], names)
    with pytest.raises(ValueError, match="sensitivity='fisher' needs output-gradient statistics"):
        lowrank_model(model, None, LowRankConfig(rank_reduction=None, budget=0.2), stats=plain)


def test_state_dict_and_deepcopy_round_trip():
    calib = [tokens(2, 16, 0)]
    a, b = tiny_llama(layers=1, seed=0), tiny_llama(layers=1, seed=1)
    lowrank_model(a, calib, LowRankConfig())
    lowrank_model(b, calib, LowRankConfig())  # same shapes -> same ranks
    state = a.state_dict()
    # One A per unit (q/k/v, o, gate/up, down_proj) per layer: the shared A is stored once.
    assert sum(k.endswith(".down.weight") for k in state) == 4
    b.load_state_dict(state)
    ids = tokens(2, 16, 5)
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits)
        c = copy.deepcopy(a)
        assert c.model.layers[0].self_attn.k_proj.down is c.model.layers[0].self_attn.q_proj.down
        assert c.model.layers[0].self_attn.k_proj.down is not a.model.layers[0].self_attn.q_proj.down
        torch.testing.assert_close(c(ids).logits, a(ids).logits)


def test_lowrank_then_dkm_prepare_train_finalize():
    model = tiny_llama(hidden=64, layers=1)
    lowrank_model(model, [tokens(4, 32, 0)], LowRankConfig(rank_reduction=0.25, rank_multiple=8))
    edkm.prepare(model, edkm.DKMConfig(bits=4, min_weight_numel=0, init_iters=10))
    names = [n for n, _, _ in edkm.clustered_layers(model)]
    downs = [n for n in names if n.endswith(".down")]
    # The shared A is clustered once: one `down` per unit (q/k/v, o, gate/up, down_proj).
    assert len(downs) == 4 and len(names) == 4 + 7, names
    ids = tokens(4, 32, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    shared_down = model.model.layers[0].self_attn.q_proj.down
    assert shared_down.parametrizations.weight.original.grad is not None
    model.eval()
    with torch.no_grad():
        ref = model(ids).logits
    edkm.finalize(model)
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 7
    assert all(isinstance(m.down, LUTLinear) and isinstance(m.up, LUTLinear) for m in lowrank)
    attn = model.model.layers[0].self_attn
    assert attn.v_proj.down is attn.q_proj.down
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bench


def test_bench_smoke_run_on_tiny_model(tmp_path):
    """bench/lowrank.py runs end to end as users run it and writes one row per result."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "lowrank.jsonl"
    args = ["bench/lowrank.py", "--model", "tiny", "--quick", "--pcts", "25", "--types", "attn", "--repeats", "1",
            "--out", str(out)]
    proc = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    variants = {(r["section"], r["variant"]) for r in rows}
    assert {("sweep", "attn-svd"), ("sweep", "attn-aa"), ("alloc", "budget-fisher"), ("speed", "qkv_proj"),
            ("dkm", "dkm3")} <= variants, variants
    lord_dkm = next(r for r in rows if r["section"] == "dkm" and r["variant"].endswith("+dkm4"))
    dkm3 = next(r for r in rows if r["variant"] == "dkm3")
    assert lord_dkm["bits_per_weight"] <= dkm3["bits_per_weight"]  # equal-bits comparison really is
    assert all(math.isfinite(r["ppl"]) for r in rows if "ppl" in r)
    assert all(r["model"] == "tiny" and "git_commit" in r for r in rows)
    assert "== sweep ==" in proc.stdout and "== dkm ==" in proc.stdout


def test_lord_then_dkm_export_reload_is_exact(tmp_path):
    import edkm
    from edkm.hub.models import tiny_llama

    model = tiny_llama(vocab_size=256, hidden=64, layers=2)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    lowrank_model(model, [ids], LowRankConfig(rank_reduction=0.25))
    edkm.prepare(model, edkm.DKMConfig(bits=4, min_weight_numel=0))
    edkm.finalize(model.eval())
    with torch.no_grad():
        want = model(ids).logits
    path = tmp_path / "m.edkm.safetensors"
    edkm.export_compressed(model, path, lut_dtype=None, dense_dtype=None)
    got = edkm.load_compressed(path)
    assert sum(isinstance(m, LowRankLinear) for m in got.modules()) > 0
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want, rtol=0, atol=0)
