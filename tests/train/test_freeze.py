"""``optim.freeze``: parameters kept at their float values, by name pattern."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import edkm
from edkm.hub.models import tiny_llama
from edkm.train.checkpoint import latest_checkpoint, load_checkpoint
from edkm.train.config import ConfigError, OptimConfig, load_config
from edkm.train.loop import train
from edkm.train.steps import freeze_parameters

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _prepared():
    model = tiny_llama(vocab_size=256, hidden=64, layers=2)
    edkm.prepare(model, edkm.DKMConfig(bits=3, min_weight_numel=0))
    return model


def test_freeze_by_either_name_of_a_tied_parameter():
    for pattern in ("model.embed_tokens.*", "lm_head.weight"):
        model = _prepared()
        emb = model.model.embed_tokens.weight
        assert emb is model.lm_head.weight
        assert freeze_parameters(model, (pattern,)) == emb.numel()
        assert not emb.requires_grad
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen == ["model.embed_tokens.weight"], (pattern, frozen)


def test_freeze_patterns_that_match_nothing_or_a_clustered_weight_are_errors():
    model = _prepared()
    with pytest.raises(ValueError, match=r"'model\.embed\.\*' matches no parameter"):
        freeze_parameters(model, ("model.embed.*",))
    with pytest.raises(ValueError, match=r"'\*q_proj\*' matches the clustered weight "
                                         r"'model\.layers\.0\.self_attn\.q_proj\.weight' and 1 more"):
        freeze_parameters(model, ("*q_proj*",))
    assert all(p.requires_grad for p in model.parameters())  # a refused call freezes nothing
    assert freeze_parameters(model, ()) == 0


def test_freeze_config_is_a_tuple_of_distinct_patterns():
    assert OptimConfig(freeze="model.norm.weight").freeze == ("model.norm.weight",)
    assert OptimConfig(freeze=["a", "b"]).freeze == ("a", "b")
    for bad in (["a", "a"], [""], [3]):
        with pytest.raises(ValueError, match="optim.freeze"):
            OptimConfig(freeze=bad)


def test_trainer_keeps_frozen_parameters_bitwise_and_refuses_a_changed_freeze_on_resume(tmp_path):
    over = [f"run.output_dir={tmp_path}", "optim.max_steps=4", "run.save_every=2", "run.export=false"]
    cfg = load_config(TINY, over + ["optim.freeze=[model.embed_tokens.weight, '*norm.weight']"])
    train(cfg)
    state, _ = load_checkpoint(latest_checkpoint(tmp_path))
    got = state["model"]
    fresh = tiny_llama(vocab_size=256, hidden=cfg.model.tiny_hidden, layers=cfg.model.tiny_layers,
                       seed=cfg.run.seed, max_positions=512).state_dict()
    norms = [k for k in fresh if k.endswith("norm.weight")]
    assert len(norms) == 5
    for k in ["model.embed_tokens.weight", *norms]:
        assert torch.equal(got[k], fresh[k]), k
    trained = "model.layers.0.mlp.down_proj.parametrizations.weight.original"
    assert not torch.equal(got[trained], fresh["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(ConfigError, match=r"optim\.freeze"):
        train(load_config(TINY, over + ["optim.max_steps=6"]), resume=True)
