"""``DKMConfig.tau_mode="gap"``: per-layer tau from centroid spacing, kept in ``state_dict``."""

from __future__ import annotations

import pytest
import torch

import edkm
from edkm.config import TAU_MIN
from edkm.layers import DKMWeight
from edkm.preparation import set_gap_taus


def tiny(seed: int = 0):
    from edkm.hub.models import tiny_llama

    torch.manual_seed(seed)
    model = tiny_llama(vocab_size=128, hidden=48, layers=2)
    with torch.no_grad():  # layers of very different spread, as attention and MLP weights are
        for i, (_, m) in enumerate(m for m in model.named_modules() if isinstance(m[1], torch.nn.Linear)):
            m.weight.mul_(0.25 * (i % 5 + 1))
    return model


def spacing_by_hand(c: torch.Tensor) -> float:
    """Independent reference of `DKMWeight.spacing`: Python loops over (G, K, d) centroids."""
    G, K, d = c.shape
    values = []
    for g in range(G):
        pts = [c[g, k].tolist() for k in range(K)]
        if d == 1:
            s = sorted(p[0] for p in pts)
            values += [(b - a) ** 2 for a, b in zip(s, s[1:])]
        else:
            for i, p in enumerate(pts):
                values.append(min(sum((x - y) ** 2 for x, y in zip(p, q)) for j, q in enumerate(pts) if j != i))
    values.sort()
    return values[(len(values) - 1) // 2]  # torch.median is the lower median


@pytest.mark.parametrize("cluster_dim,granularity", [(1, "per_tensor"), (1, "per_grouped_channel"), (2, "per_tensor")])
def test_spacing_matches_a_hand_reference(cluster_dim, granularity):
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    p = DKMWeight(w, edkm.DKMConfig(bits=3, cluster_dim=cluster_dim, granularity=granularity, min_weight_numel=0))
    assert p.spacing() == pytest.approx(spacing_by_hand(p.centroids.double()), rel=1e-12)


def test_gap_mode_scales_each_layer_by_its_spacing_over_the_median():
    cfg = edkm.DKMConfig(bits=3, tau=2e-4, tau_mode="gap", min_weight_numel=0)
    model = edkm.prepare(tiny(), cfg)
    layers = list(edkm.clustered_layers(model))
    gaps = [spacing_by_hand(p.centroids.double()) for _, _, p in layers]
    ref = sorted(gaps)[len(gaps) // 2]
    taus = [p.tau for _, _, p in layers]
    assert taus == pytest.approx([2e-4 * g / ref for g in gaps], rel=1e-6)  # the factor is kept in fp32
    assert max(taus) / min(taus) > 4  # the layers' spreads differ, so their taus do
    for _, _, p in layers:
        assert float(p.tau_scale) == pytest.approx(p.tau / 2e-4, rel=1e-6)
    plain = edkm.prepare(tiny(), cfg.replace(tau_mode="global"))
    assert all(p.tau == 2e-4 and float(p.tau_scale) == 1.0 for _, _, p in edkm.clustered_layers(plain))


def test_the_forward_uses_the_layers_own_tau():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(4), requires_grad=True)
    scaled = DKMWeight(w.detach(), edkm.DKMConfig(bits=3, tau=1e-3, min_weight_numel=0))
    scaled.set_tau_scale(0.05)
    same = DKMWeight(w.detach(), edkm.DKMConfig(bits=3, tau=1e-3 * 0.05, min_weight_numel=0))
    other = DKMWeight(w.detach(), edkm.DKMConfig(bits=3, tau=1e-3, min_weight_numel=0))
    outs = []
    for p in (scaled, same, other):
        out = p(w)
        (g,) = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape).sin()).sum(), w)
        outs.append((out.detach(), g))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])
    scaled.config = scaled.config.replace(tau=2e-3)  # the trainer's tau schedule replaces the base tau
    assert scaled.tau == pytest.approx(2e-3 * 0.05)


def test_state_dict_carries_the_factor_and_old_checkpoints_load_as_one_tau():
    cfg = edkm.DKMConfig(bits=3, tau_mode="gap", min_weight_numel=0)
    a = edkm.prepare(tiny(), cfg)
    name, _, pa = next(iter(edkm.clustered_layers(a)))
    pa.set_tau_scale(3.7)
    b = edkm.prepare(tiny(), cfg)
    b.load_state_dict(a.state_dict())
    pb = dict((n, p) for n, _, p in edkm.clustered_layers(b))[name]
    assert pb.tau == pytest.approx(cfg.tau * 3.7) and float(pb.tau_scale) == pytest.approx(3.7)
    old = {k: v for k, v in a.state_dict().items() if not k.endswith(".tau_scale")}
    c = edkm.prepare(tiny(), cfg)
    c.load_state_dict(old)  # strict: the missing factor reads as 1 (a run from before tau_mode)
    assert all(p.tau == cfg.tau for _, _, p in edkm.clustered_layers(c))
    bad = dict(a.state_dict())
    key = next(k for k in bad if k.endswith(".tau_scale"))
    bad[key] = torch.tensor(float("nan"))
    with pytest.raises(RuntimeError, match=r"tau_scale must be a finite number > 0, got nan"):
        edkm.prepare(tiny(), cfg).load_state_dict(bad)


def test_degenerate_layers_and_bad_values():
    const = DKMWeight(torch.ones(16, 16), edkm.DKMConfig(bits=2, min_weight_numel=0))
    wide = DKMWeight(torch.randn(16, 16) * 10, edkm.DKMConfig(bits=2, min_weight_numel=0))
    tight = DKMWeight(torch.randn(16, 16) * 1e-12, edkm.DKMConfig(bits=2, tau=1e-20, min_weight_numel=0))
    assert const.spacing() == 0.0
    set_gap_taus([const, wide, tight], tight.config)
    assert float(const.tau_scale) == 1.0  # nothing to scale by: the plain tau
    assert tight.tau >= TAU_MIN * (1 - 1e-12)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tau_scale must be a finite number > 0"):
            wide.set_tau_scale(bad)
    with pytest.raises(ValueError, match=r"tau_mode must be one of \('global', 'gap'\), got 'layer'"):
        edkm.DKMConfig(tau_mode="layer")
