"""edkm.evaluate.fidelity against per-token references, on the tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from edkm.evaluate import Fidelity, fidelity, perplexity
from edkm.hub.models import tiny_llama


@pytest.fixture(scope="module")
def models():
    """A teacher with peaked predictions and a noisy copy of it (partial agreement)."""
    teacher = tiny_llama(hidden=32, layers=1, seed=0, tie_embeddings=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # random init is nearly uniform: make the argmax mean something
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.5)
    return teacher, student


def _windows(n=5, length=11):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))


def test_fidelity_matches_a_float64_reference(models):
    teacher, student = models
    windows = _windows()
    got = fidelity(student, teacher, windows, batch_size=2)  # 2 + 2 + 1: sums across uneven batches
    with torch.no_grad():
        s = student(input_ids=windows).logits[:, :-1].double()
        t = teacher(input_ids=windows).logits[:, :-1].double()
    target = windows[:, 1:]
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="none", log_target=True).sum(-1)
    assert got.n_predictions == 5 * 10
    assert got.kl == pytest.approx(kl.mean().item(), rel=1e-5)
    assert got.top1_agreement == pytest.approx((s.argmax(-1) == t.argmax(-1)).double().mean().item(), abs=1e-12)
    assert 0 < got.top1_agreement < 1  # two different random models: partial agreement
    nll_s = F.cross_entropy(s.flatten(0, 1), target.flatten())
    assert got.perplexity == pytest.approx(math.exp(nll_s.item()), rel=1e-5)
    assert got.perplexity == pytest.approx(perplexity(student, windows), rel=1e-6)
    assert got.teacher_perplexity == pytest.approx(perplexity(teacher, windows), rel=1e-6)
    assert got.ppl_ratio == pytest.approx(got.perplexity / got.teacher_perplexity)
    assert set(got.to_dict()) == {"perplexity", "teacher_perplexity", "kl", "top1_agreement", "n_predictions",
                                  "ppl_ratio"}


def test_student_equal_to_teacher_is_perfectly_faithful(models):
    teacher, _ = models
    got = fidelity(teacher, teacher, _windows(3))
    assert abs(got.kl) < 1e-6 and got.top1_agreement == 1.0 and got.ppl_ratio == pytest.approx(1.0)


def test_modes_restored_and_bad_windows_named(models):
    teacher, student = models
    student.train()
    fidelity(student, teacher, _windows(2))
    assert student.training and not teacher.training
    student.eval()
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        fidelity(student, teacher, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="0"):
        fidelity(student, teacher, _windows(2), batch_size=0)
    with pytest.raises(ValueError, match="differ"):
        fidelity(student, tiny_llama(vocab_size=300, hidden=32, layers=1), _windows(2))


def test_fidelity_is_a_frozen_record():
    f = Fidelity(perplexity=2.0, teacher_perplexity=1.0, kl=0.1, top1_agreement=0.5, n_predictions=4)
    assert f.ppl_ratio == 2.0
    with pytest.raises(AttributeError):
        f.kl = 0.0


def test_cached_teacher_logits_give_the_same_scores(models):
    from edkm.evaluate import teacher_logits

    teacher, student = models
    windows = _windows(5)
    cached = teacher_logits(teacher, windows, batch_size=3)
    assert cached.shape == (5, 10, 256) and cached.dtype == torch.float32
    live = fidelity(student, teacher, windows, batch_size=2)
    reused = fidelity(student, None, windows, batch_size=2, cached_teacher_logits=cached)
    assert reused.kl == pytest.approx(live.kl, rel=1e-6) and reused.top1_agreement == live.top1_agreement
    assert reused.teacher_perplexity == pytest.approx(live.teacher_perplexity, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(5, 9, 256\)"):
        fidelity(student, None, windows, cached_teacher_logits=cached[:, :9])
    with pytest.raises(ValueError, match="needs a teacher"):
        fidelity(student, None, windows)
