"""data.source: teacher windows are the float model's samples (cached and reused), mix is
half corpus and half teacher, corpus is unchanged; the held-out split never moves."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import edkm.hub.teacher_text as teacher_text
from edkm.hub.teacher_text import sample_teacher_windows
from edkm.train.config import load_config
from edkm.train.data import load_inputs
from edkm.train.loop import train
from edkm.train.sources import training_windows

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _cfg(tmp_path, *over):
    return load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", f"data.teacher_cache_dir={tmp_path / 'cache'}",
                              "data.max_train_windows=32", "data.heldout_windows=2", "data.teacher_windows=6",
                              "data.eval_domains=[heldout]", "run.export=false", *over])


def test_teacher_source_is_the_float_models_samples_and_the_cache_is_reused(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "data.source=teacher")
    model, tok, windows = load_inputs(cfg)
    got = training_windows(cfg, model, tok, windows)
    want = sample_teacher_windows(model, 6, cfg.data.seq_len, batch_size=6, seed=cfg.run.seed,
                                  cache_dir=tmp_path / "other-cache")
    assert torch.equal(got.train, want) and got.train.shape == (6, cfg.data.seq_len)
    assert got.heldout is windows.heldout
    assert not any(torch.equal(w, c) for w in got.train for c in windows.train)  # not corpus text
    assert len(list((tmp_path / "cache").glob("teacher-text-*"))) == 1

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although the cache holds these windows")

    monkeypatch.setattr(teacher_text, "_sample_batch", no_sampling)
    assert torch.equal(training_windows(cfg, model, tok, windows).train, got.train)
    batched = _cfg(tmp_path, "data.source=teacher", "data.teacher_batch=4")  # 2 batches (4 + 2): other samples
    monkeypatch.undo()
    want = sample_teacher_windows(model, 6, cfg.data.seq_len, batch_size=4, seed=cfg.run.seed,
                                  cache_dir=tmp_path / "other-cache")
    assert torch.equal(training_windows(batched, model, tok, windows).train, want)
    monkeypatch.setattr(teacher_text, "_sample_batch", no_sampling)
    for over in ("run.seed=1", "data.teacher_temperature=0.7", "data.teacher_top_k=20"):  # another cache entry
        with pytest.raises(AssertionError, match="sampled again"):
            training_windows(_cfg(tmp_path, "data.source=teacher", over), model, tok, windows)


def test_teacher_temperature_and_top_k_reach_the_sampler(tmp_path):
    cfg = _cfg(tmp_path, "data.source=teacher", "data.teacher_temperature=0.5", "data.teacher_top_k=3")
    model, tok, windows = load_inputs(cfg)
    got = training_windows(cfg, model, tok, windows).train
    want = sample_teacher_windows(model, 6, cfg.data.seq_len, batch_size=6, seed=cfg.run.seed, temperature=0.5,
                                  top_k=3, cache_dir=tmp_path / "other-cache")
    default = sample_teacher_windows(model, 6, cfg.data.seq_len, batch_size=6, seed=cfg.run.seed,
                                     cache_dir=tmp_path / "other-cache")
    assert torch.equal(got, want) and not torch.equal(got, default)


def test_mix_is_half_corpus_half_teacher_and_corpus_is_unchanged(tmp_path):
    mix = _cfg(tmp_path, "data.source=mix")
    model, tok, windows = load_inputs(mix)
    teacher = training_windows(_cfg(tmp_path, "data.source=teacher"), model, tok, windows).train
    got = training_windows(mix, model, tok, windows).train
    assert got.shape == (12, mix.data.seq_len)
    assert torch.equal(got[6:], teacher)
    rows = [next(i for i, c in enumerate(windows.train) if torch.equal(w, c)) for w in got[:6]]  # each is a corpus row
    assert len(set(rows)) == 6 and rows == sorted(rows) and max(rows) > 6  # spread over the corpus, not its head
    assert training_windows(_cfg(tmp_path), model, tok, windows) is windows


def test_a_teacher_run_trains_on_sampled_text_and_logs_the_token_count(tmp_path, caplog, capsys):
    cfg = _cfg(tmp_path, "data.source=teacher", "optim.max_steps=2", "optim.loss=kd", "optim.lr=3e-4")
    with caplog.at_level(logging.INFO, logger="edkm"):
        result = train(cfg)
    assert "teacher text: sampling 6 of 6 windows x 64 tokens" in caplog.text  # minutes of work: announced
    assert "teacher text:" in capsys.readouterr().err  # and its progress bar drawn at INFO
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.metrics)
    assert "teacher text: 6 windows x 64 tokens = 384 tokens" in caplog.text
    assert "data.source=teacher: 6 training windows (384 tokens), 6 of them sampled from the float model" in caplog.text


def test_compensation_takes_the_runs_own_teacher_windows_without_sampling_again(tmp_path, monkeypatch):
    import edkm.train.steps as steps

    seen = []
    monkeypatch.setattr(steps, "input_hessians", lambda model, text, dkm: seen.append(text) or {})
    mix = _cfg(tmp_path, "data.source=mix", "data.teacher_batch=2", "data.compensate_windows=4")
    model, tok, windows = load_inputs(mix)
    teacher = training_windows(mix, model, tok, windows).train[6:]  # the run's 6 sampled windows (3 batches)
    monkeypatch.setattr(teacher_text, "_sample_batch", lambda *a, **k: pytest.fail("sampled again"))
    steps.calibration_hessians(model, tok, windows.train, mix, torch.device("cpu"))
    assert torch.equal(seen[-1], teacher[:4])
    monkeypatch.undo()
    # A draw of its own when the run samples fewer windows (or none): the same text, batch for batch.
    monkeypatch.setattr(steps, "input_hessians", lambda model, text, dkm: seen.append(text) or {})
    for over in (["data.compensate_windows=4"], ["data.source=teacher", "data.teacher_windows=2",
                                                 "data.compensate_windows=4"]):
        steps.calibration_hessians(model, tok, windows.train, _cfg(tmp_path, "data.teacher_batch=2", *over),
                                   torch.device("cpu"))
        assert torch.equal(seen[-1], teacher[:4])
    assert len(list((tmp_path / "cache").glob("teacher-text-*"))) == 2  # the run's 6 windows; 4 of their own (both)
