"""The eval-mode code cache of `DKMWeight`: reused only while weight and centroids are unchanged."""

from __future__ import annotations

import copy

import torch

import edkm
from edkm.hub.models import tiny_llama
from edkm.layers.parametrization import clustered_layers


def _prepared(bits: int = 3):
    model = tiny_llama(vocab_size=256, hidden=64, layers=2)
    edkm.prepare(model, edkm.DKMConfig(bits=bits, granularity="per_grouped_channel", group_size=8,
                                       min_weight_numel=0, include_embeddings=True))
    return model


def _uncached(model):
    ref = copy.deepcopy(model)
    for _, _, p in clustered_layers(ref):
        p.cache_codes = False
    return ref.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_cached_eval_equals_a_fresh_search_and_follows_every_change():
    model = _prepared().eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    first = _logits(model, ids)
    _, _, param = next(clustered_layers(model))
    codes = param._codes[4]
    assert codes.dtype == torch.uint8
    assert torch.equal(_logits(model, ids), first)
    assert param._codes[4] is codes  # reused, not searched again
    assert torch.equal(first, _logits(_uncached(model), ids))

    # A weight changed in place (an optimizer step, load_state_dict) moves some points to
    # other centroids: the cache must see it.
    with torch.no_grad():
        for _, module, _ in clustered_layers(model):
            w = module.parametrizations.weight.original
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * w.std())
    moved = _logits(model, ids)
    assert not torch.equal(moved, first)
    assert torch.equal(moved, _logits(_uncached(model), ids))

    # Centroids changed in place (a training forward writes them).
    with torch.no_grad():
        for _, _, p in clustered_layers(model):
            p.centroids.mul_(1.5)
    scaled = _logits(model, ids)
    assert not torch.equal(scaled, moved)
    assert torch.equal(scaled, _logits(_uncached(model), ids))

    # A state dict loaded in eval mode.
    other = _prepared()
    model.load_state_dict(other.state_dict())
    assert torch.equal(_logits(model, ids), _logits(other.eval(), ids))


def test_train_mode_drops_the_cache_and_a_training_step_is_seen():
    model = _prepared(bits=4)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    model.eval()
    before = _logits(model, ids)
    model.train()
    assert all(p._codes is None for _, _, p in clustered_layers(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    after = _logits(model, ids)
    assert not torch.equal(after, before)
    assert torch.equal(after, _logits(_uncached(model), ids))


def test_cache_off_keeps_nothing():
    model = _prepared()
    for _, _, p in clustered_layers(model):
        p.cache_codes = False
    model.eval()
    _logits(model, torch.zeros(1, 4, dtype=torch.long))
    assert all(p._codes is None for _, _, p in clustered_layers(model))
