"""prepare -> train -> finalize on a tiny random LlamaForCausalLM, and config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import edkm
from edkm.layers import LUTEmbedding, LUTLinear


def tiny(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))


CFG = edkm.DKMConfig(bits=4, min_weight_numel=0, tau=1e-4)


def decoder_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def train(model, steps=8, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = batch()
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "config",
    [
        CFG,
        CFG.replace(bits=3, granularity="per_grouped_channel", group_size=8),
        CFG.replace(cluster_dim=2, bits=3),
        CFG.replace(uniquify=False),
        CFG.replace(cluster_dtype="bfloat16"),
    ],
    ids=["4bit-tensor", "3bit-grouped", "vector-d2", "naive", "bf16-cluster-of-fp32"],
)
def test_prepare_train_finalize_tiny_llama(config):
    model = tiny()
    edkm.prepare(model, config)
    names = [n for n, _, _ in edkm.clustered_layers(model)]
    assert sorted(names) == sorted(decoder_linears(model))
    assert "lm_head" not in names and not any("embed" in n for n in names)
    losses = train(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    # Every trainable weight got a gradient through DKM.
    for _, module, _ in edkm.clustered_layers(model):
        assert module.parametrizations.weight.original.grad is not None
    model.eval()
    ids = batch(1)
    with torch.no_grad():
        hard_logits = model(ids).logits
    edkm.finalize(model)
    assert not list(edkm.clustered_layers(model))
    luts = [m for m in model.modules() if isinstance(m, LUTLinear)]
    assert len(luts) == len(names)
    for m in luts:
        assert m.indices.dtype == torch.uint8 and int(m.indices.max()) < config.n_clusters
        w = m.dense_weight().reshape(m.lut.shape[0], -1, config.cluster_dim)
        for g in range(w.shape[0]):
            assert torch.unique(w[g], dim=0).shape[0] <= config.n_clusters
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hard_logits, rtol=0, atol=0)


def test_finalize_is_nearest_centroid():
    model = tiny()
    edkm.prepare(model, CFG)
    train(model, steps=2)
    name, module, param = next(iter(edkm.clustered_layers(model)))
    w = module.parametrizations.weight.original.detach().reshape(1, -1, 1)
    c = param.centroids  # (1, K, 1)
    want = c[0, (w - c.transpose(1, 2)).abs()[0].argmin(-1), 0].reshape(module.parametrizations.weight.original.shape)
    edkm.finalize(model)
    got = model.get_submodule(name).dense_weight()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_state_dict_to_and_optimizer_keep_working():
    model = tiny()
    edkm.prepare(model, CFG)
    sd = model.state_dict()
    assert any(k.endswith("parametrizations.weight.original") for k in sd)
    assert any(k.endswith("parametrizations.weight.0.centroids") for k in sd)
    clone = tiny(seed=1)
    edkm.prepare(clone, CFG)
    clone.load_state_dict(sd)
    model.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch()).logits, clone(batch()).logits)
    model.to(torch.float64)
    assert all(p.centroids.dtype == torch.float64 for _, _, p in edkm.clustered_layers(model))
    model.train()
    model(batch(), labels=batch()).loss.backward()


def test_bf16_model_trains_with_uniquify():
    model = tiny().to(torch.bfloat16)
    edkm.prepare(model, CFG.replace(bits=3))
    losses = train(model, steps=6, lr=3e-3)
    assert losses[-1] < losses[0], losses
    edkm.finalize(model)
    assert all(m.lut.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, LUTLinear))


def test_include_embeddings_with_tied_head():
    model = tiny(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    edkm.prepare(model, CFG.replace(include_embeddings=True))
    names = [n for n, _, _ in edkm.clustered_layers(model)]
    assert "lm_head" in names and "model.embed_tokens" in names
    train(model, steps=2)
    model.eval()
    with torch.no_grad():
        want = model(batch()).logits
    edkm.finalize(model)
    assert isinstance(model.model.embed_tokens, LUTEmbedding) and isinstance(model.lm_head, LUTLinear)
    assert model.lm_head.indices is model.model.embed_tokens.indices
    with torch.no_grad():
        torch.testing.assert_close(model(batch()).logits, want, rtol=0, atol=0)


def test_include_exclude_and_min_size():
    model = tiny()
    edkm.prepare(model, CFG.replace(include=("*mlp*",), exclude=("*down_proj",)))
    names = [n for n, _, _ in edkm.clustered_layers(model)]
    assert names and all("mlp" in n and "down_proj" not in n for n in names)
    with pytest.raises(ValueError, match="no layer matched"):
        edkm.prepare(tiny(), CFG.replace(min_weight_numel=10**9))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 0}, "bits must be an integer in \\[1, 8\\], got 0"),
        ({"bits": 9}, "bits must be an integer in \\[1, 8\\], got 9"),
        ({"granularity": "per_row"}, "per_row"),
        ({"tau": 0.0}, "tau .* got 0.0"),
        ({"max_iters": 0}, "max_iters .* got 0"),
        ({"backend": "cuda"}, "'cuda'"),
    ],
)
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        edkm.DKMConfig(**kwargs)


def test_config_roundtrip_and_unknown_keys():
    cfg = CFG.replace(include=["*proj"], granularity="per_grouped_channel")
    assert edkm.DKMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bitz"):
        edkm.DKMConfig.from_dict({"bitz": 4})


def test_shape_and_weight_errors_name_layer_and_value():
    with pytest.raises(ValueError, match=r"q_proj.*group_size=5 does not divide"):
        edkm.prepare(tiny(), CFG.replace(granularity="per_grouped_channel", group_size=5))
    with pytest.raises(ValueError, match=r"cluster_dim=5 does not divide the weight's 48"):
        edkm.prepare(tiny(), CFG.replace(cluster_dim=5))
    model = tiny()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers.0.self_attn.q_proj.*NaN"):
        edkm.prepare(model, CFG)
    with pytest.raises(ValueError, match="already parametrized"):
        edkm.prepare(edkm.prepare(tiny(), CFG), CFG)


@pytest.mark.parametrize("rebuild", [False, True])
def test_offload_option_gives_bitwise_equal_gradients(rebuild):
    grads = []
    for offload in (False, True):
        model = tiny()
        edkm.prepare(model, CFG.replace(bits=3, offload=offload, rebuild=rebuild, cluster_dtype="bfloat16"))
        model.train()
        model(batch(), labels=batch()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("cluster_dtype", ["weight", "bfloat16"])
def test_rebuild_option_gives_bitwise_equal_training(cluster_dtype):
    """DKMConfig(rebuild=True) (backward rebuilds the table) trains to the same bits."""
    runs = []
    for rebuild in (False, True):
        model = tiny()
        edkm.prepare(model, CFG.replace(bits=3, granularity="per_grouped_channel", group_size=8,
                                        cluster_dtype=cluster_dtype, rebuild=rebuild))
        losses = train(model, steps=3)
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


@pytest.mark.slow
def test_smollm2_prepare_train_finalize():
    from edkm.hub.models import load_smollm2

    model, tok = load_smollm2()
    edkm.prepare(model, edkm.DKMConfig(bits=4, cluster_dtype="bfloat16"))
    names = [n for n, _, _ in edkm.clustered_layers(model)]
    assert len(names) == 30 * 7  # q, k, v, o, gate, up, down in each of 30 layers
    ids = tok("In the beginning God created the heaven and the earth. And the earth was without form",
              return_tensors="pt").input_ids
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    edkm.finalize(model)
    assert sum(isinstance(m, LUTLinear) for m in model.modules()) == 210
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_hf_trainer_trains_a_prepared_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny()
    edkm.prepare(model, CFG)
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, save_strategy="no",
                             report_to=[], use_cpu=True, learning_rate=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "original" in n)
    edkm.finalize(model.eval())
    assert sum(isinstance(m, LUTLinear) for m in model.modules()) == len(decoder_linears(tiny()))
