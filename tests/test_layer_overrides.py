"""``DKMConfig.layers``: per-layer bits and LUT groups (mixed precision), end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize

import edkm
from edkm.export import export_compressed, load_compressed
from edkm.hub.models import tiny_llama
from edkm.layers import LUTLinear
from edkm.train.config import ConfigError, load_config
from edkm.train.loop import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
MIXED = {"*.v_proj": {"bits": 5}, "*k_proj": {"bits": 6, "group_size": 2}, "*.mlp.*": {"group_size": 8}}


def mixed_config(**kw) -> edkm.DKMConfig:
    return edkm.DKMConfig(bits=3, granularity="per_grouped_channel", group_size=4, min_weight_numel=0,
                          layers=MIXED, **kw)


def expected(name: str) -> tuple[int, int]:
    """(bits, rows per LUT) the layer called ``name`` should get, by hand from MIXED."""
    if name.endswith(".v_proj"):
        return 5, 4
    if name.endswith("k_proj"):
        return 6, 2
    if ".mlp." in name:
        return 3, 8
    return 3, 4


def test_for_layer_first_match_wins_and_keeps_the_rest():
    cfg = edkm.DKMConfig(bits=4, tau=3e-4, layers=[("*.v_proj", {"bits": 6}), ("*proj", {"bits": 2})])
    assert cfg.for_layer("model.layers.0.self_attn.v_proj").bits == 6  # listed first
    assert cfg.for_layer("model.layers.0.self_attn.q_proj").bits == 2
    other = cfg.for_layer("lm_head")
    assert other.bits == 4 and other.tau == 3e-4 and other.layers == ()
    assert cfg.for_layer("x.v_proj").tau == 3e-4  # only the listed keys change


def test_layers_round_trip_through_dict_and_yaml_override():
    cfg = mixed_config()
    assert edkm.DKMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict()["layers"] == MIXED
    tc = load_config(TINY, ['dkm.layers={"*.v_proj": {bits: 5}}'])
    assert tc.dkm.for_layer("model.layers.1.self_attn.v_proj").bits == 5
    assert tc.dkm.for_layer("model.layers.1.self_attn.q_proj").bits == 4


@pytest.mark.parametrize("layers,match", [
    ({"*": {"tau": 1e-3}}, r"\['tau'\] cannot differ per layer"),
    ({"*.v_proj": {"bits": 9}}, r"layers\['\*.v_proj'\]: bits must be an integer in \[1, 8\], got 9"),
    ({"*.v_proj": {}}, "non-empty mapping"),
    ({"*.v_proj": 5}, "got 5"),
    ("*.v_proj", "must be a mapping"),
    ({"": {"bits": 3}}, "non-empty strings, got ''"),
])
def test_bad_layers_entries_name_the_pattern_and_value(layers, match):
    with pytest.raises(ValueError, match=match):
        edkm.DKMConfig(layers=layers)


def test_bad_layers_in_a_train_config_is_a_config_error():
    with pytest.raises(ConfigError, match="granularity must be one of"):
        load_config(TINY, ['dkm.layers={"*": {granularity: rows}}'])


def test_a_group_size_that_does_not_fit_names_the_layer():
    model = tiny_llama(hidden=64, layers=1, intermediate=128)  # o_proj: 64 output rows, not a multiple of 48
    cfg = edkm.DKMConfig(granularity="per_grouped_channel", group_size=4, min_weight_numel=0,
                         layers={"*.o_proj": {"group_size": 48}})
    with pytest.raises(ValueError, match=r"o_proj.*group_size=48"):
        edkm.prepare(model, cfg)


def test_a_pattern_that_matches_no_clustered_layer_is_an_error():
    model = tiny_llama(hidden=64, layers=1, intermediate=128)
    cfg = edkm.DKMConfig(min_weight_numel=0, layers={"*.v_proj": {"bits": 5}, "*.vproj": {"bits": 6}})
    with pytest.raises(ValueError, match=r"\['\*\.vproj'\] apply to no layer"):  # the typo, not the good one
        edkm.prepare(model, cfg)
    # A pattern for a layer that exists but is excluded selects nothing either.
    cfg = edkm.DKMConfig(min_weight_numel=0, exclude=("*.v_proj",), layers={"*.v_proj": {"bits": 5}})
    with pytest.raises(ValueError, match=r"\['\*\.v_proj'\] apply to no layer"):
        edkm.prepare(tiny_llama(hidden=64, layers=1, intermediate=128), cfg)
    # A pattern that only matches layers an earlier pattern claims never applies: named as shadowed.
    model = tiny_llama(hidden=64, layers=1, intermediate=128)
    cfg = edkm.DKMConfig(min_weight_numel=0, layers={"*_proj": {"bits": 5}, "*.v_proj": {"bits": 6}})
    with pytest.raises(ValueError, match=r"\['\*\.v_proj'\] only match layers an earlier pattern claims"):
        edkm.prepare(model, cfg)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # refused before any change


def test_mixed_model_trains_finalizes_and_exports_per_layer_shapes(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=128, hidden=64, layers=2, intermediate=128)
    edkm.prepare(model, mixed_config())
    layers = list(edkm.clustered_layers(model))
    assert len(layers) == 14
    for name, module, p in layers:
        bits, rows = expected(name)
        assert p.config.bits == bits and p.config.group_size == rows, name
        assert p.centroids.shape == (module.weight.shape[0] // rows, 2**bits, 1), name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    grads = {n: m.parametrizations.weight.original.grad for n, m, _ in layers}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    opt.step()
    edkm.finalize(model.eval())
    with torch.no_grad():
        want = model(ids).logits
    luts = {n: m for n, m in model.named_modules() if isinstance(m, LUTLinear)}
    code_bytes = 0
    for name, m in luts.items():
        bits, rows = expected(name)
        G, K, _ = m.lut.shape
        assert (G, K) == (m.out_features // rows, 2**bits), name
        assert len(torch.unique(m.dense_weight()[:rows])) <= 2**bits, name
        code_bytes += math.ceil(m.indices.numel() * bits / 8)
    path = tmp_path / "mixed.edkm.safetensors"
    sizes = export_compressed(model, path, lut_dtype=None, dense_dtype=None)
    assert sizes["codes"] == code_bytes  # each layer's codes packed at its own width
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(path)(ids).logits, want, rtol=0, atol=0)


def test_trainer_run_with_mixed_layers_resumes_and_exports(tmp_path):
    over = [f"run.output_dir={tmp_path}", "optim.max_steps=4", "run.save_every=2",
            'dkm.layers={"*.v_proj": {bits: 6}, "*.down_proj": {bits: 2}}']
    result = train(load_config(TINY, over))
    model = load_compressed(result.export_path)
    widths = {n: m.lut.shape[1] for n, m in model.named_modules() if isinstance(m, LUTLinear)}
    assert {n.rsplit(".", 1)[-1]: k for n, k in widths.items()} == {
        "q_proj": 16, "k_proj": 16, "v_proj": 64, "o_proj": 16, "gate_proj": 16, "up_proj": 16, "down_proj": 4}
    # Resuming with other per-layer widths would load centroids of the wrong shape: refused.
    with pytest.raises(Exception, match="cannot change mid-run: dkm.layers"):
        train(load_config(TINY, [*over[:2], "optim.max_steps=6", 'dkm.layers={"*.v_proj": {bits: 3}}']),
              resume=True)
