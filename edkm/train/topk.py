"""``optim.kd_topk``: distil from the teacher's top-k logits on disk, with no teacher resident.

Before training, the float model runs once over every training window the run will draw
(``optim.max_steps`` x ``grad_accum`` micro-batches of every process, `run_windows`) and
`edkm.hub.teacher_topk.precompute_teacher_topk` stores its ``k`` largest logits per
position under ``<output_dir>/teacher_topk/<hash of those windows>`` (resumable shard by
shard; a ``--resume`` reuses it) with the log-normaliser at ``optim.kd_temperature``.
Training then uses `edkm.distill.topk_distill_loss` with the teacher's tail pooled into
one outcome (the KL of the pooled distributions: below the full KL, equal at k = V).
The held-out KL that scores checkpoints (``run.best_by=kl``) uses the float model's
logits on the held-out windows, kept once (`heldout_reference`), so no float model is
needed for it either; the final domain report keeps ``optim.loss=ce``'s memory rule (the
float logits when they are smaller than a copy of the model, else the copy).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edkm.train.config import TrainConfig
from edkm.train.data import micro_indices

log = logging.getLogger(__name__)


def run_windows(order: Tensor, config: TrainConfig, world: int) -> Tensor:
    """Sorted unique indices of the training windows a run draws in ``optim.max_steps``
    steps (every micro-batch of every process, wrapping epochs as `micro_batch` does)."""
    o = config.optim
    used = {i for micro in range(o.max_steps * o.grad_accum) for rank in range(world)
            for i in micro_indices(order, micro, o.batch_size, world, rank)}
    return torch.tensor(sorted(used), dtype=torch.long)


class TopKTeacher:
    """The teacher's stored top-k logits, looked up by training-window index.

    Args:
        store: The `edkm.hub.teacher_topk.TeacherTopK` of the windows ``index`` names.
        index: (m,) sorted training-window indices, row i of ``store`` being window index[i].
    """

    def __init__(self, store: Any, index: Tensor) -> None:
        self.store, self.k = store, store.k
        self._row = {int(w): r for r, w in enumerate(index.tolist())}

    def batch(self, windows: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(values, ids, logsumexp)`` of these training-window indices (`TeacherTopK.batch`)."""
        missing = [w for w in windows if w not in self._row]
        if missing:
            raise KeyError(f"training windows {missing[:4]} have no stored teacher top-k (the store covers the "
                           f"{len(self._row)} windows of optim.max_steps)")
        return self.store.batch([self._row[w] for w in windows])


def teacher_topk(model: torch.nn.Module, train: Tensor, order: Tensor, config: TrainConfig, out: Path,
                 acc: Any) -> TopKTeacher:
    """Store (main process; the others wait) and open the float model's top-k logits of
    the run's training windows.

    Args:
        model: The float model, before `edkm.prepare`. train: (n, L) training windows.
        order: The run's data permutation. config: Its ``optim.kd_topk`` is k.
        out: The run directory. acc: The ``accelerate.Accelerator``.
    Returns:
        A `TopKTeacher`. Raises ``ValueError`` when k exceeds the vocabulary.
    """
    from edkm.hub.teacher_topk import TeacherTopK, precompute_teacher_topk, windows_hash

    index = run_windows(order, config, acc.num_processes)
    windows = train[index]
    key = windows_hash(windows)[:16]
    root = out / "teacher_topk"
    directory = root / f"{key}-k{config.optim.kd_topk}"
    if acc.is_main_process:
        for stale in (p for p in root.glob("*") if p != directory):  # another max_steps / data: never read again
            shutil.rmtree(stale, ignore_errors=True)
        log.info("teacher top-%d logits of %d training windows (%d tokens) -> %s", config.optim.kd_topk,
                 windows.shape[0], windows.numel(), directory)
        precompute_teacher_topk(model, windows, directory, config.optim.kd_topk, batch_size=config.optim.batch_size,
                                progress=log.isEnabledFor(logging.INFO), temperature=config.optim.kd_temperature)
    acc.wait_for_everyone()
    return TopKTeacher(TeacherTopK(directory), index)


def heldout_reference(model: torch.nn.Module, heldout: Tensor, domains: list) -> Tensor:
    """The float model's logits on the held-out windows, for the checkpoints' KL score:
    the ``heldout`` domain's kept logits when they are these windows, else computed once."""
    from edkm.evaluate import teacher_logits

    for dom in domains:
        if dom.logits is not None and dom.windows is heldout:
            return dom.logits
    return teacher_logits(model, heldout, batch_size=4)
