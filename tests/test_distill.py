"""edkm.distill: the KL losses against torch.nn.functional.kl_div in float64, and the HF Trainer mixin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import edkm
from edkm.distill import DistillTrainerMixin, distill_loss, per_token_kl, topk_distill_loss

V = 37  # odd, not a power of two


def _logits(*shape, seed=0, scale=3.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def _reference(student, teacher, temperature, mask=None):
    """Independent spec: kl_div(log q, log p, log_target) summed over the vocabulary, T**2, masked mean."""
    log_q = F.log_softmax(student.double() / temperature, -1)
    log_p = F.log_softmax(teacher.double() / temperature, -1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1) * temperature**2  # (...)
    if mask is None:
        return kl.mean()
    return kl[mask.bool()].mean()


def test_exported_from_package():
    assert edkm.distill_loss is distill_loss and edkm.topk_distill_loss is topk_distill_loss


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_distill_loss_and_gradient_match_kl_div_reference(temperature):
    student = _logits(3, 5, V, seed=1).requires_grad_(True)
    teacher = _logits(3, 5, V, seed=2)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    assert 0 < mask.sum() < mask.numel()
    ours = distill_loss(student, teacher, temperature, mask=mask)
    ref_student = student.detach().clone().requires_grad_(True)
    ref = _reference(ref_student, teacher, temperature, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    upstream = 0.7
    (ours * upstream).backward()
    (ref * upstream).backward()
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-10, atol=1e-14)
    assert (student.grad[~mask] == 0).all() and student.grad[mask].abs().sum() > 0


def test_temperature_scales_as_t_squared_times_softened_kl():
    student, teacher = _logits(4, V, seed=4), _logits(4, V, seed=5)
    t = 3.0
    soft = per_token_kl(student, teacher, t).mean()
    assert distill_loss(student, teacher, t).item() == pytest.approx(t**2 * soft.item(), rel=1e-12)
    assert soft < per_token_kl(student, teacher, 1.0).mean()  # softer distributions are closer


def test_loss_is_zero_for_equal_logits_and_shift_invariant():
    teacher = _logits(2, 6, V, seed=6)
    assert distill_loss(teacher + 5.0, teacher).abs().item() < 1e-12  # softmax ignores a constant shift
    assert distill_loss(_logits(2, 6, V, seed=7), teacher).item() > 0.1


def test_reductions_and_teacher_gets_no_gradient():
    student = _logits(2, 4, V, seed=8).requires_grad_(True)
    teacher = _logits(2, 4, V, seed=9).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1]])
    per = distill_loss(student, teacher, mask=mask, reduction="none")
    assert per.shape == (2, 4) and (per[mask == 0] == 0).all()
    torch.testing.assert_close(distill_loss(student, teacher, mask=mask, reduction="sum"), per.sum())
    torch.testing.assert_close(distill_loss(student, teacher, mask=mask), per.sum() / 5)
    distill_loss(student, teacher).backward()
    assert teacher.grad is None


def test_low_precision_logits_are_upcast():
    student, teacher = _logits(8, V, seed=10), _logits(8, V, seed=11)
    ref = _reference(student.bfloat16(), teacher.bfloat16(), 1.0)  # same rounded inputs, fp64 math
    ours = distill_loss(student.bfloat16(), teacher.bfloat16())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=1e-7)  # fp32 vs fp64 softmax


def test_bad_inputs_name_the_value():
    s, t = _logits(2, V), _logits(2, V)
    with pytest.raises(ValueError, match="-1.0"):
        distill_loss(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(2, 36\)"):
        distill_loss(s, t[:, :-1])
    with pytest.raises(ValueError, match=r"\(3,\)"):
        distill_loss(s, t, mask=torch.ones(3))
    with pytest.raises(ValueError, match="'avg'"):
        distill_loss(s, t, reduction="avg")


# ----------------------------------------------------------------------------- top-k


def test_topk_with_full_vocabulary_equals_full_kl_with_gradient():
    student = _logits(3, 4, V, seed=12).requires_grad_(True)
    teacher = _logits(3, 4, V, seed=13)
    values, indices = teacher.topk(V, dim=-1)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0]])
    full_student = student.detach().clone().requires_grad_(True)
    ours = topk_distill_loss(student, values, indices, temperature=1.5, mask=mask)
    full = distill_loss(full_student, teacher, temperature=1.5, mask=mask)
    torch.testing.assert_close(ours, full, rtol=1e-12, atol=1e-14)
    ours.backward()
    full.backward()
    torch.testing.assert_close(student.grad, full_student.grad, rtol=1e-10, atol=1e-14)


def test_topk_matches_hand_computed_renormalised_kl():
    student = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[5.0, 4.0]], dtype=torch.float64)
    indices = torch.tensor([[3, 0]])
    p = torch.tensor([5.0, 4.0]).double().softmax(0)  # teacher renormalised over its 2 ids
    log_q = student[0].log_softmax(0)[[3, 0]]  # student's full-vocabulary log-probs there
    expected = (p * (p.log() - log_q)).sum()
    torch.testing.assert_close(topk_distill_loss(student, values, indices), expected, rtol=1e-12, atol=0)


def test_topk_with_the_tail_matches_a_hand_computed_pooled_kl():
    student = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    teacher = torch.tensor([[4.0, 0.5, -1.0, 5.0]], dtype=torch.float64)
    for T in (1.0, 2.0):
        p, q = (teacher[0] / T).softmax(0), (student[0] / T).softmax(0)
        P = torch.stack([p[3], p[0], p[1] + p[2]])  # ids 3, 0 and the pooled tail {1, 2}
        Q = torch.stack([q[3], q[0], q[1] + q[2]])
        want = T**2 * (P * (P.log() - Q.log())).sum()
        got = topk_distill_loss(student, teacher[:, [3, 0]], torch.tensor([[3, 0]]), temperature=T,
                                teacher_logsumexp=torch.logsumexp(teacher / T, -1))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_topk_with_the_tail_is_below_the_full_kl_equal_at_k_v_and_zero_for_the_teacher_itself():
    gen = torch.Generator().manual_seed(15)
    teacher = torch.randn(8, 5, 64, generator=gen, dtype=torch.float64) * 0.3  # a flat teacher
    student = (teacher + 0.5 * torch.randn(8, 5, 64, generator=gen, dtype=torch.float64)).requires_grad_(True)
    lse = torch.logsumexp(teacher / 1.5, -1)
    full = distill_loss(student, teacher, temperature=1.5)
    losses = []
    for k in (1, 4, 16, 63, 64):
        values, indices = teacher.topk(k, -1)
        losses.append(topk_distill_loss(student, values, indices, temperature=1.5, teacher_logsumexp=lse))
        assert topk_distill_loss(teacher, values, indices, 1.5, teacher_logsumexp=lse).abs() < 1e-12
    assert all(a <= b + 1e-12 for a, b in zip(losses, losses[1:])), losses  # pooling less never lowers the KL
    torch.testing.assert_close(losses[-1], full, rtol=1e-12, atol=0)
    (g_k,) = torch.autograd.grad(losses[-1], student)
    (g_full,) = torch.autograd.grad(full, student)
    torch.testing.assert_close(g_k, g_full, rtol=1e-10, atol=1e-14)
    renormalised = topk_distill_loss(teacher, *teacher.topk(4, -1))  # the student is the teacher, yet:
    assert renormalised > 1.0  # ~log(64 / 4): why the trainer always passes the log-normaliser
    with pytest.raises(ValueError, match=r"teacher_logsumexp shape \(8,\) must be the logits' leading shape \(8, 5\)"):
        topk_distill_loss(student, values, indices, teacher_logsumexp=lse[:, 0])


def test_topk_gradient_approaches_full_kl_as_k_grows():
    """A peaked teacher (like an LM's): a small k already gives nearly the full-KL gradient."""
    gen = torch.Generator().manual_seed(14)
    vocab = 512
    teacher = torch.randn(64, vocab, generator=gen, dtype=torch.float64) * 4.0
    student0 = teacher + torch.randn(64, vocab, generator=gen, dtype=torch.float64)

    def grad(fn):
        s = student0.clone().requires_grad_(True)
        fn(s).backward()
        return s.grad.flatten()

    full = grad(lambda s: distill_loss(s, teacher))
    cosines, gaps = [], []
    for k in (4, 32, 256, vocab):
        values, indices = teacher.topk(k, -1)
        g = grad(lambda s: topk_distill_loss(s, values, indices))
        cosines.append(F.cosine_similarity(g, full, dim=0).item())
        loss_k = topk_distill_loss(student0, values, indices).item()
        gaps.append(abs(loss_k - distill_loss(student0, teacher).item()))
    assert cosines == sorted(cosines) and cosines[-1] == pytest.approx(1.0, abs=1e-12), cosines
    assert cosines[1] > 0.9, cosines  # k = 32 of 512
    assert gaps[-1] < 1e-12 and gaps[0] > gaps[2], gaps


def test_topk_rejects_out_of_range_ids_and_bad_shapes():
    s = _logits(2, V)
    values, indices = s.topk(3, -1)
    with pytest.raises(ValueError, match=str(V)):
        topk_distill_loss(s, values, indices + V)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        topk_distill_loss(s, values, indices[:, :2])


# ----------------------------------------------------------------------------- HF Trainer


def test_trainer_mixin_trains_a_student_towards_its_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")
    from edkm.hub.models import tiny_llama

    class DistillTrainer(DistillTrainerMixin, transformers.Trainer):
        pass

    teacher = tiny_llama(hidden=32, layers=1, seed=0)
    student = tiny_llama(hidden=32, layers=1, seed=1)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]

    def kl() -> float:
        with torch.no_grad():
            return distill_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits).item()

    before = kl()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=3e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    trainer = DistillTrainer(model=student, args=args, train_dataset=rows, teacher=teacher, distill_temperature=1.0)
    trainer.train()
    assert kl() < 0.7 * before, (before, kl())
    assert all(p.grad is None for p in teacher.parameters())
    # gradient accumulation: 2 x 2 windows makes the same SGD step as one batch of 4 (the loss is divided by 2)
    stepped = {}
    for accum, bs in ((1, 4), (2, 2)):
        model = tiny_llama(hidden=32, layers=1, seed=1)
        ga_args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=bs,
                                                 gradient_accumulation_steps=accum, learning_rate=1.0, optim="sgd",
                                                 lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
        DistillTrainer(model=model, args=ga_args, train_dataset=rows[:4], teacher=teacher).train()
        stepped[accum] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny_llama(hidden=32, layers=1, seed=1).parameters()])
    assert (stepped[1] - start).abs().max() > 1e-4  # the step moved the weights
    torch.testing.assert_close(stepped[2] - start, stepped[1] - start, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="0.0"):
        DistillTrainer(model=student, args=args, teacher=teacher, distill_temperature=0.0)
    with pytest.raises(ValueError, match="ce_weight must be a finite number >= 0, got nan"):  # passed `< 0`
        DistillTrainer(model=student, args=args, teacher=teacher, ce_weight=float("nan"))
