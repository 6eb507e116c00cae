"""edkm.hub.teacher_topk: teacher top-k logits on disk, resumable, read back for topk_distill_loss."""

from __future__ import annotations

import pytest
import torch

from edkm.distill import topk_distill_loss
from edkm.hub.models import tiny_llama
from edkm.hub.shards import shard_path
from edkm.hub.teacher_topk import TeacherTopK, precompute_teacher_topk


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(hidden=32, layers=1, seed=0)


def _windows(n=5, length=9):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))


def test_stored_topk_equals_live_teacher_topk(teacher, tmp_path):
    windows = _windows()
    store = precompute_teacher_topk(teacher, windows, tmp_path / "c", k=8, batch_size=2, shard_windows=2,
                                    values_dtype=torch.float32)
    assert len(store) == 5 and store.k == 8 and len(list((tmp_path / "c").glob("shard-*"))) == 3
    with torch.no_grad():
        live = teacher(input_ids=windows).logits.topk(8, -1)
    pick = torch.tensor([4, 0, 3])
    values, ids, lse = store.batch(pick)
    assert values.shape == ids.shape == (3, 9, 8) and ids.dtype == torch.int64 and lse.shape == (3, 9)
    with torch.no_grad():
        full = teacher(input_ids=windows).logits
    torch.testing.assert_close(lse, torch.logsumexp(full[pick], -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(values, live.values[pick], rtol=0, atol=1e-5)  # batch-size-dependent GEMMs
    assert torch.equal(ids, live.indices[pick])
    student = tiny_llama(hidden=32, layers=1, seed=1)
    logits = student(input_ids=windows[pick]).logits
    torch.testing.assert_close(topk_distill_loss(logits, values, ids),
                               topk_distill_loss(logits, live.values[pick], live.indices[pick]), rtol=1e-5, atol=1e-6)
    hot = precompute_teacher_topk(teacher, windows, tmp_path / "t2", k=8, temperature=2.0)
    torch.testing.assert_close(hot.batch([1])[2], torch.logsumexp(full[1:2] / 2.0, -1), rtol=0, atol=1e-5)
    assert hot.temperature == 2.0


def test_fp16_values_and_reopen_from_directory(teacher, tmp_path):
    windows = _windows(3)
    precompute_teacher_topk(teacher, windows, tmp_path, k=4)
    values, _, _ = TeacherTopK(tmp_path).batch([2])
    assert values.dtype == torch.float16
    with torch.no_grad():
        live = teacher(input_ids=windows[2:3]).logits.topk(4, -1).values
    torch.testing.assert_close(values.float(), live, rtol=1e-3, atol=1e-3)


def test_resume_recomputes_only_missing_shards(teacher, tmp_path):
    windows = _windows(6)
    precompute_teacher_topk(teacher, windows, tmp_path, k=4, shard_windows=2)
    first = TeacherTopK(tmp_path).batch(range(6))
    shard_path(tmp_path, 1).unlink()
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = precompute_teacher_topk(teacher, windows, tmp_path, k=4, shard_windows=2).batch(range(6))
    finally:
        handle.remove()
    assert len(calls) == 1  # shard 1 only (2 windows, one batch)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_other_settings_in_the_same_directory_are_refused(teacher, tmp_path):
    windows = _windows(2)
    precompute_teacher_topk(teacher, windows, tmp_path, k=4)
    with pytest.raises(ValueError, match="k=4"):
        precompute_teacher_topk(teacher, windows, tmp_path, k=5)
    with pytest.raises(ValueError, match="windows_sha256"):
        precompute_teacher_topk(teacher, windows + 1, tmp_path, k=4)
    with pytest.raises(ValueError, match="model"):
        precompute_teacher_topk(tiny_llama(hidden=32, layers=1, seed=9), windows, tmp_path, k=4)
    with pytest.raises(ValueError, match="temperature=1.0, not 2.0"):
        precompute_teacher_topk(teacher, windows, tmp_path, k=4, temperature=2.0)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 2', '"format": 1'))
    with pytest.raises(ValueError, match="format 1, not 2: delete it"):
        TeacherTopK(tmp_path)


def test_progress_bar_only_when_asked(teacher, tmp_path, capsys):
    precompute_teacher_topk(teacher, _windows(2), tmp_path / "a", k=2)
    assert "teacher top-k" not in capsys.readouterr().err
    precompute_teacher_topk(teacher, _windows(2), tmp_path / "b", k=2, progress=True)
    assert "teacher top-k" in capsys.readouterr().err


def test_bad_inputs_name_the_value(teacher, tmp_path):
    with pytest.raises(ValueError, match="257"):
        precompute_teacher_topk(teacher, _windows(2), tmp_path, k=257)
    with pytest.raises(ValueError, match=r"\(9,\)"):
        precompute_teacher_topk(teacher, _windows(1)[0], tmp_path, k=2)
    store = precompute_teacher_topk(teacher, _windows(2), tmp_path, k=2)
    with pytest.raises(IndexError, match="2"):
        store.batch([2])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        precompute_teacher_topk(teacher, _windows(2), tmp_path / "z", k=2, temperature=0)
    with pytest.raises(FileNotFoundError, match="no teacher top-k cache"):
        TeacherTopK(tmp_path / "nothing")
