"""edkm.hub.teacher_text: windows sampled from the teacher with a KV cache, cached and resumable."""

from __future__ import annotations

import logging

import pytest
import torch

from edkm.hub.models import tiny_llama
from edkm.hub.shards import shard_path
from edkm.hub.teacher_text import sample_teacher_windows, teacher_text_dir


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(hidden=32, layers=2, seed=0)


class Counter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


def test_all_greedy_windows_equal_argmax_decoding_without_cache(teacher, tmp_path):
    got = sample_teacher_windows(teacher, 3, 12, batch_size=2, greedy_tokens=100, seed=1, cache_dir=tmp_path)
    assert got.shape == (3, 12) and got.dtype == torch.int64
    with torch.no_grad():  # reference: full recomputation every step, no KV cache
        seq = got[:, :1]
        for _ in range(11):
            nxt = teacher(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(got, seq)


def test_sampling_is_seeded_cached_and_resumable(teacher, tmp_path, caplog):
    kw = dict(batch_size=2, seed=3, cache_dir=tmp_path, exclude_ids=range(0, 128))
    with caplog.at_level(logging.INFO, logger="edkm.hub.teacher_text"):
        first = sample_teacher_windows(teacher, 5, 10, **kw)
    assert "5 windows x 10 tokens = 50 tokens" in caplog.text
    assert "sampling 5 of 5 windows x 10 tokens (3 batches)" in caplog.text
    assert (first[:, 0] >= 128).all()  # start tokens avoid the excluded ids
    assert len(first.unique()) > 10  # sampled, not one repeated token
    dirs = list(tmp_path.glob("teacher-text-*"))
    assert len(dirs) == 1 and len(list(dirs[0].glob("shard-*.safetensors"))) == 3

    counter = Counter(teacher)
    assert torch.equal(sample_teacher_windows(teacher, 5, 10, **kw), first)
    assert counter.calls == 0  # served from the cache
    shard_path(dirs[0], 1).unlink()  # an interrupted run: batch 1 missing
    assert torch.equal(sample_teacher_windows(teacher, 5, 10, **kw), first)
    assert counter.calls == 9  # one batch regenerated: 1 prefill + 8 cached steps
    other = sample_teacher_windows(teacher, 5, 10, **{**kw, "seed": 4})
    assert not torch.equal(other, first) and len(list(tmp_path.glob("teacher-text-*"))) == 2


def test_top_k_one_is_greedy_and_temperature_changes_the_text(teacher, tmp_path):
    greedy = sample_teacher_windows(teacher, 2, 8, greedy_tokens=100, seed=5, cache_dir=tmp_path)
    top1 = sample_teacher_windows(teacher, 2, 8, greedy_tokens=0, top_k=1, seed=5, cache_dir=tmp_path)
    assert torch.equal(greedy, top1)
    hot = sample_teacher_windows(teacher, 2, 8, greedy_tokens=0, temperature=5.0, seed=5, cache_dir=tmp_path)
    assert not torch.equal(hot, greedy)


def test_prefix_is_fed_but_not_returned(teacher, tmp_path):
    got = sample_teacher_windows(teacher, 2, 6, greedy_tokens=100, prefix_ids=[7], seed=6, cache_dir=tmp_path)
    with torch.no_grad():
        seq = torch.cat([torch.full((2, 1), 7), got[:, :1]], 1)
        for _ in range(5):
            seq = torch.cat([seq, teacher(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[:, 1:])


def test_progress_bar_only_when_asked(teacher, tmp_path, capsys):
    sample_teacher_windows(teacher, 2, 4, seed=7, cache_dir=tmp_path)
    assert "teacher text" not in capsys.readouterr().err
    sample_teacher_windows(teacher, 2, 4, seed=8, cache_dir=tmp_path, progress=True)
    assert "teacher text" in capsys.readouterr().err


def test_cache_key_depends_on_the_model(tmp_path):
    a, b = tiny_llama(hidden=32, layers=1, seed=0), tiny_llama(hidden=32, layers=1, seed=1)
    sample_teacher_windows(a, 1, 4, cache_dir=tmp_path)
    sample_teacher_windows(b, 1, 4, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("teacher-text-*"))) == 2


@pytest.mark.parametrize("kwargs, bad", [({"n_windows": 0}, "0"), ({"temperature": -2.0}, "-2.0"),
                                         ({"top_k": 0}, "top_k"), ({"greedy_tokens": -1}, "-1")])
def test_bad_settings_name_the_value(teacher, tmp_path, kwargs, bad):
    args = {"n_windows": 2, "seq_len": 4, **kwargs}
    with pytest.raises(ValueError, match=bad):
        sample_teacher_windows(teacher, args.pop("n_windows"), args.pop("seq_len"), cache_dir=tmp_path, **args)


def test_cache_dir_defaults_to_edkm_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EDKM_CACHE_DIR", str(tmp_path))
    assert teacher_text_dir(None, {"a": 1}).parent == tmp_path


def test_sampled_tokens_follow_the_softmax_and_skip_masked_entries():
    from edkm.hub.teacher_text import _next_token

    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, -30.0, 0.0]).expand(40_000, -1)  # (B, V), one row repeated
    gen = torch.Generator().manual_seed(0)
    for temperature, top_k in ((1.0, None), (0.7, None), (1.0, 3)):
        ids = _next_token(logits, False, temperature, top_k, gen)
        assert ids.shape == (40_000, 1) and ids.dtype == torch.int64
        scaled = logits[0] / temperature
        if top_k is not None:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
        p = scaled.softmax(-1).double()
        freq = torch.bincount(ids[:, 0], minlength=6).double() / ids.shape[0]
        sigma = (p * (1 - p) / ids.shape[0]).sqrt()
        assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (temperature, top_k, freq, p)
        if top_k is not None:
            assert freq[p == 0].sum() == 0  # masked entries are never drawn
