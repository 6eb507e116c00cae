"""Generation from an export, HF interop, the save_pretrained-style folder, and the LUT decode cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edkm
from edkm.cli import main
from edkm.deploy.folder import load_folder, save_folder
from edkm.deploy.generate import generate, generate_ids, pick_next
from edkm.export import load_compressed
from edkm.hub.models import tiny_llama
from edkm.hub.tokenizer import ByteTokenizer
from edkm.layers import LUTLinear


def _finalized() -> nn.Module:
    model = tiny_llama()
    edkm.prepare(model, edkm.DKMConfig(bits=3, granularity="per_grouped_channel"))
    return edkm.finalize(model)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tiny-3bit"
    save_folder(_finalized(), ByteTokenizer(), path)
    return path


def test_folder_round_trip(folder):
    assert {"config.json", "model.edkm.safetensors", "edkm_tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model, tok = load_folder(folder)
    assert isinstance(tok, ByteTokenizer)
    same = load_compressed(folder / "model.edkm.safetensors")  # load_compressed takes the folder or its file
    ids = torch.tensor([tok.encode("In the beginning")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, same(ids).logits)
        assert torch.equal(load_compressed(folder)(ids).logits, same(ids).logits)


def test_hf_generate_on_load_compressed_matches_ours(folder):
    model, tok = load_folder(folder)
    prompt = tok.encode("And God said")
    ours = list(generate_ids(model, prompt, 12))
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert hf[0, len(prompt):].tolist() == ours


def test_cached_steps_equal_full_forwards(folder):
    model, tok = load_folder(folder)
    prompt = tok.encode("Let there be light")
    new = list(generate_ids(model, prompt, 8, temperature=1.0, seed=3))
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        full = model(seq).logits[0, len(prompt) - 1 : -1]  # logits that chose each new token
    greedy = list(generate_ids(model, prompt, 8))
    assert full.argmax(-1)[0].item() == greedy[0]
    # With the sampled prefix forced, each greedy step from the cache equals the full forward's argmax.
    for j in range(1, len(new)):
        step = next(generate_ids(model, prompt + new[:j], 1))
        assert step == full[j].argmax().item(), j


def test_sampling_is_seeded_and_top_k_one_is_greedy(folder):
    model, tok = load_folder(folder)
    prompt = tok.encode("Hi")
    a = list(generate_ids(model, prompt, 16, temperature=1.0, seed=1))
    b = list(generate_ids(model, prompt, 16, temperature=1.0, seed=1))
    c = list(generate_ids(model, prompt, 16, temperature=1.0, seed=2))
    assert a == b and a != c
    top1 = list(generate_ids(model, prompt, 16, temperature=0.7, top_k=1, seed=5))
    assert top1 == list(generate_ids(model, prompt, 16))
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert {pick_next(logits, 1.0, 2, g) for _ in range(200)} == {1, 3}


def test_generate_streams_text_and_counts(folder):
    model, tok = load_folder(folder)
    pieces = []
    g = generate(model, tok, "Hello", max_new_tokens=10, on_text=pieces.append)
    assert "".join(pieces) == g.text == tok.decode(g.ids)
    assert len(g.ids) == 10 and g.prompt_tokens == 5 and g.tokens_per_s > 0


def test_cli_generate(folder, capsys):
    model, tok = load_folder(folder)
    expected = generate(model, tok, "Hello", max_new_tokens=6).text
    assert main(["--quiet", "generate", "--model", str(folder), "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == "Hello" + expected + "\n"
    assert "tokens/s" in out.err


def test_generate_errors(folder):
    model, _ = load_folder(folder)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        list(generate_ids(model, [1], 0))
    with pytest.raises(ValueError, match="empty"):
        list(generate_ids(model, [], 3))
    with pytest.raises(FileNotFoundError, match="not an edkm folder"):
        load_folder(folder.parent)
    from edkm.deploy.formats import write_format

    with pytest.raises(ValueError, match="unknown deployment format 'onnx'"):
        write_format(model, None, "onnx", folder.parent / "x")


# ----------------------------------------------------------------------------- decode cache


def _layer() -> LUTLinear:
    g = torch.Generator().manual_seed(0)
    lut = torch.randn(2, 8, 1, generator=g)
    idx = torch.randint(0, 8, (32, 24), generator=g)
    return LUTLinear(lut, idx, None, (32, 24)).eval()


def test_decode_cache_reuses_and_matches():
    layer, x = _layer(), torch.randn(3, 24)
    w1 = layer.decoded_weight(torch.float32)
    assert layer.decoded_weight(torch.float32) is w1  # decoded once
    assert torch.equal(w1, layer.dense_weight())
    layer.cache_decoded = False
    plain = layer(x)
    layer.cache_decoded = True
    assert torch.equal(layer(x), plain)
    assert layer.decoded_weight(torch.float16).dtype == torch.float16  # per compute dtype


def test_decode_cache_invalidation():
    layer, x = _layer(), torch.randn(3, 24)
    before = layer(x)
    with torch.no_grad():
        layer.lut.mul_(2)  # in place: version counter moves
    torch.testing.assert_close(layer(x), 2 * before)
    layer.indices = torch.zeros_like(layer.indices)  # replaced buffer
    assert torch.equal(layer.decoded_weight(torch.float32), layer.dense_weight())
    w = layer.decoded_weight(torch.float32)
    layer.train()
    assert layer._decoded is None and layer.decoded_weight(torch.float32) is not w
    layer.eval()
    assert torch.equal(layer.decoded_weight(torch.float32), w)


def test_cli_checkpoint_to_folder_to_generate(tmp_path, capsys):
    from pathlib import Path

    from edkm.train.checkpoint import save_checkpoint
    from edkm.train.config import load_config
    from edkm.train.data import load_model

    # A training checkpoint as `edkm train` writes it (prepared model state + config), without training.
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", [])
    prepared, _ = load_model(config)
    edkm.prepare(prepared, config.dkm)
    save_checkpoint(tmp_path / "run", 1, {"model": prepared.state_dict()}, meta={"config": config.to_dict()})
    out = tmp_path / "folder"
    args = ["--quiet", "export", "--format", "folder", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]
    assert main(args) == 0
    model, tok = load_folder(out)
    assert isinstance(tok, ByteTokenizer) and any(isinstance(m, LUTLinear) for m in model.modules())
    capsys.readouterr()
    assert main(["--quiet", "generate", "--model", str(out), "--prompt", "In", "--max-new-tokens", "4",
                 "--temperature", "0.8", "--top-k", "20", "--seed", "7"]) == 0
    text = generate(model, tok, "In", max_new_tokens=4, temperature=0.8, top_k=20, seed=7).text
    assert capsys.readouterr().out == "In" + text + "\n"
