"""Precompute the teacher's top-k logits per token to disk, so the teacher need not stay resident.

`precompute_teacher_topk` runs the float model over token windows once and stores, per
window and position, its ``k`` largest logits, their vocabulary ids and the log-normaliser
``logsumexp(logits / T)`` (what the tail of the distribution holds) in safetensors shards
(values fp16 by default, ids int32, normaliser fp32; for 1M tokens at k = 64: 388 MB). It is
resumable (whole shards are skipped on a rerun with the same settings) and shows a tqdm
bar only when asked. `TeacherTopK` reads them back by window index for
`edkm.distill.topk_distill_loss`::

    store = precompute_teacher_topk(teacher, windows, "cache/topk", k=64)
    values, ids, lse = store.batch(torch.tensor([3, 7]))   # (2, L, 64), (2, L, 64), (2, L)
    loss = edkm.topk_distill_loss(student(input_ids=windows[[3, 7]]).logits, values, ids,
                                  teacher_logsumexp=lse)

The cache's manifest holds k, T, the window shape, a hash of the windows' token ids and the
teacher's fingerprint, so a changed input is never served from a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from edkm._checks import check_int, check_number
from edkm.hub.shards import MANIFEST, model_fingerprint, open_cache, read_shard, shard_path, write_shard

logger = logging.getLogger(__name__)

__all__ = ["precompute_teacher_topk", "TeacherTopK"]

FORMAT = 2  # 2: with the log-normaliser per position


def windows_hash(windows: Tensor) -> str:
    """A 32-hex-digit SHA-256 prefix of token windows' int64 ids (the cache manifest's key)."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:32]


def precompute_teacher_topk(
    teacher: nn.Module,
    windows: Tensor,
    directory: str | Path,
    k: int = 64,
    *,
    batch_size: int = 8,
    shard_windows: int = 256,
    values_dtype: torch.dtype = torch.float16,
    progress: bool = False,
    temperature: float = 1.0,
) -> "TeacherTopK":
    """Run ``teacher`` on every window and store its top-k logits per position.

    Args:
        teacher: a causal LM returning ``.logits`` (run in eval mode under no_grad; its
            mode is restored).
        windows: (n, L) int64 token ids.
        directory: cache directory (created); a rerun with the same settings resumes.
        k: logits kept per position, 1 <= k <= vocabulary size.
        batch_size: windows per teacher forward.
        shard_windows: windows per shard file (the unit of resumption).
        values_dtype: dtype the logits are stored in (fp16: ~0.01 absolute error at |logit| 20).
        progress: show a tqdm progress bar over windows.
        temperature: T of the stored log-normaliser (the distillation temperature).

    Returns:
        A `TeacherTopK` reading the cache.

    Raises:
        ValueError: bad shapes or sizes, or a directory built with other settings.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 1:
        raise ValueError(f"windows must be (n >= 1, L >= 1) token ids, got shape {tuple(windows.shape)}")
    for name, value in (("k", k), ("batch_size", batch_size), ("shard_windows", shard_windows)):
        check_int(name, value)
    check_number("temperature", temperature)
    vocab = int(teacher.get_output_embeddings().weight.shape[0]) if hasattr(teacher, "get_output_embeddings") else None
    if vocab is not None and k > vocab:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary size {vocab}")
    n, seq_len = windows.shape
    settings = {"format": FORMAT, "kind": "teacher_topk", "k": k, "temperature": float(temperature),
                "n_windows": n, "seq_len": seq_len,
                "shard_windows": shard_windows, "values_dtype": str(values_dtype).removeprefix("torch."),
                "windows_sha256": windows_hash(windows), "model": model_fingerprint(teacher)}
    directory = open_cache(directory, settings)
    n_shards = -(-n // shard_windows)
    todo = [i for i in range(n_shards) if not shard_path(directory, i).is_file()]
    logger.info("teacher top-%d: %d windows x %d tokens in %d shards, %d to compute, in %s",
                k, n, seq_len, n_shards, len(todo), directory)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=n - sum(min(shard_windows, n - i * shard_windows) for i in todo),
                   desc="teacher top-k", unit="window")
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for shard in todo:
                rows = windows[shard * shard_windows : (shard + 1) * shard_windows]
                values, ids, lse = [], [], []
                for batch in rows.split(batch_size):
                    logits = teacher(input_ids=batch.to(device), use_cache=False).logits.float()  # (B, L, V)
                    top = logits.topk(k, dim=-1)
                    values.append(top.values.to(values_dtype).cpu())
                    ids.append(top.indices.to(torch.int32).cpu())
                    lse.append(torch.logsumexp(logits / temperature, dim=-1).cpu())
                    if bar is not None:
                        bar.update(batch.shape[0])
                write_shard(directory, shard, {"values": torch.cat(values), "indices": torch.cat(ids),
                                               "logsumexp": torch.cat(lse)})
    finally:
        teacher.train(was_training)
        if bar is not None:
            bar.close()
    return TeacherTopK(directory)


class TeacherTopK:
    """Read-only view of a `precompute_teacher_topk` cache, by window index.

    Keeps the most recently read shard in memory.

    Args:
        directory: the cache directory.

    Raises:
        FileNotFoundError: no manifest in ``directory``.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{str(self.directory)!r} holds no teacher top-k cache (no {MANIFEST})")
        self.settings = json.loads(manifest.read_text())
        if self.settings.get("format") != FORMAT:
            raise ValueError(f"{str(self.directory)!r} holds a teacher top-k cache of format "
                             f"{self.settings.get('format')!r}, not {FORMAT}: delete it and precompute again")
        self.k = int(self.settings["k"])
        self.temperature = float(self.settings["temperature"])
        self._shard_windows = int(self.settings["shard_windows"])
        self._cached: tuple[int, dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return int(self.settings["n_windows"])

    def _shard(self, index: int) -> dict[str, Tensor]:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, read_shard(self.directory, index))
        return self._cached[1]

    def batch(self, window_ids: Tensor | list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k teacher logits of some windows.

        Args:
            window_ids: indices into the windows given to `precompute_teacher_topk`.

        Returns:
            ``(values, indices, logsumexp)``: (len(window_ids), L, k) values in the stored
            dtype and int64 indices, and the (len(window_ids), L) fp32
            ``logsumexp(logits / temperature)`` (`topk_distill_loss`'s ``teacher_logsumexp``).

        Raises:
            IndexError: an index outside [0, len(self)).
        """
        ids = torch.as_tensor(window_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise IndexError(f"window ids must be in [0, {len(self)}), got {ids.tolist()}")
        values, indices, lse = [], [], []
        for i in ids.tolist():
            shard = self._shard(i // self._shard_windows)
            values.append(shard["values"][i % self._shard_windows])
            indices.append(shard["indices"][i % self._shard_windows].long())
            lse.append(shard["logsumexp"][i % self._shard_windows])
        return torch.stack(values), torch.stack(indices), torch.stack(lse)
