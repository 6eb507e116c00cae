"""coremltools peer adapters of the accuracy bench: each really palettizes exactly the decoder linears."""

import math

import pytest
import torch

pytest.importorskip("coremltools")

from bench.accuracy_peers import (  # noqa: E402
    count_lut_violations,
    ct_dkm_finalize,
    ct_dkm_prepare,
    ct_post_training,
    ct_skm,
    select_linears,
)
from edkm.hub.models import tiny_llama  # noqa: E402

BITS, GROUP = 3, 16  # tiny_llama(64, 2): out_features 64, 32 (k/v) and 176 (MLP) all divide by 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _windows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))


ADAPTERS = {
    "post_training": lambda m: ct_post_training(m, BITS, GROUP),
    "skm": lambda m: ct_skm(m, BITS, GROUP, _windows(4), batch_size=2),
    "dkm": lambda m: _dkm(m),
}


def _dkm(model: torch.nn.Module) -> torch.nn.Module:
    pal = ct_dkm_prepare(model, BITS, GROUP)
    opt = torch.optim.AdamW([model.get_submodule(n).weight for n in select_linears(model)], lr=1e-3)
    for ids in _windows(4).split(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        pal.step()
    return ct_dkm_finalize(model, pal)


def test_select_linears_skips_lm_head_and_embeddings():
    names = select_linears(tiny_llama(hidden=64, layers=2))
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_adapter_palettizes_only_decoder_linears(method):
    model = tiny_llama(hidden=64, layers=2)
    names = select_linears(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_lut_violations(model, names, BITS, GROUP) > 0  # random weights: not palettized yet

    out = ADAPTERS[method](model)

    assert out is model
    assert count_lut_violations(model, names, BITS, GROUP) == 0
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in names)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = model.state_dict()
    assert list(after) == list(before)  # coremltools' metadata buffers removed
    selected = {f"{n}.weight" for n in names}
    for key, value in before.items():  # lm_head (tied), embeddings, norms: untouched
        if key not in selected:
            assert torch.equal(after[key], value), key
    assert all(not torch.equal(after[k], before[k]) for k in selected)
    with torch.no_grad():
        batch = _windows(2, seed=1)
        assert math.isfinite(float(model(input_ids=batch, labels=batch).loss))


def test_count_lut_violations_detects_unclustered_block():
    model = tiny_llama(hidden=64, layers=2)
    names = select_linears(model)
    ct_post_training(model, BITS, GROUP)
    w = model.get_submodule(names[0]).weight
    with torch.no_grad():
        w[GROUP:2 * GROUP] += torch.linspace(0, 1e-3, w[GROUP:2 * GROUP].numel()).view_as(w[GROUP:2 * GROUP])
    assert count_lut_violations(model, names, BITS, GROUP) == 1
    assert count_lut_violations(model, names, 10, GROUP) == 0


def test_bad_group_size_and_calls_fail_clearly(monkeypatch):
    model = tiny_llama(hidden=64, layers=2)
    with pytest.raises(ValueError, match="does not divide"):
        ct_post_training(model, BITS, 7)
    with pytest.raises(RuntimeError, match="SKMPalettizer"):
        ct_skm(model, BITS, GROUP, torch.full((2, 8), 10**6))  # token ids beyond the vocabulary
    monkeypatch.setattr("bench.accuracy_peers._mem_available", lambda: 1024)
    with pytest.raises(RuntimeError, match="DKMPalettizer needs"):  # refused before any allocation
        ct_dkm_prepare(model, BITS, GROUP)
