# Saved-tensor offload for any forward pass (eDKM's cross-device tensor orchestration).
#
# `offload_saved_tensors()` installs `torch.autograd.graph.saved_tensors_hooks` so every
# tensor autograd saves for backward goes through `pack` (forward) and `unpack` (backward):
#
#   pack(t):   keep t where it is  (small, parameter, same device, unsupported layout)
#              or copy the byte span of t's storage to the offload device -- unless a copy
#              of that span of the *same live storage at the same version* already exists,
#              in which case only the view geometry is stored (dedupe).
#   unpack(h): rebuild the view on its source device: base.set_(storage, offset, size, stride).
#
# Correctness contract: the right gradient or a clear error, never a stale value.
# - A copy is a snapshot taken at save time, so later in-place changes to the source cannot
#   reach backward through it: the gradient is the one of the values that were saved.
# - Dedupe keys on the source storage object (a weak reference, so an allocator that reuses
#   the address for a new storage is a miss) and on the tensor's `_version`: a tensor changed
#   in place between two saves is copied again.
# - Anything kept by reference carries the version it had at save time; unpack raises a
#   RuntimeError like autograd's if it changed. This check is ours to make: autograd skips its
#   own version check for every tensor that goes through saved-tensor hooks.
#
# Limits: in-place writes through an alias with its own version counter (`x.data`, a second
# `torch.frombuffer` over the same memory) are invisible to autograd and to this check. Tensor
# subclasses, non-strided layouts, conj/neg-bit views and quantized tensors are kept by
# reference. Copies from an accelerator go on the current stream (pinned, non-blocking); the
# copy back is issued on the stream current at unpack, which autograd sets to the forward's.
# bytes_held counts whole storages kept alive by reference, and excludes parameters (resident
# anyway) and unsupported tensors.
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch

from edkm._checks import check_int

logger = logging.getLogger(__name__)

# Default size threshold. On a PCIe 4/5 link (25-50 GB/s) 1 MiB moves in ~20-40 us, the same
# order as the fixed cost of one offload: the hooks alone measured ~25 us per pack + ~5 us per
# unpack for a 64-byte tensor on the copy path (CPU, torch 2.13), before copy launch and
# host-allocator lookup on a GPU. Smaller copies are overhead-bound, and the tensors kept are
# tiny: for LLaMA-7B at 2048 tokens in bf16, rstd (8 KiB) and cos/sin (512 KiB each) against
# ~16 MiB for every hidden-state activation.
DEFAULT_MIN_BYTES = 2**20


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class OffloadStats:
    """Live counters of one `offload_saved_tensors` context (updated from backward too).

    Counts are per save (pack call); byte counts of copies are storage spans actually moved.
    `bytes_held` / `peak_bytes_held` are keyed by device string and count the distinct
    storages that live packed handles keep alive (offload copies and non-parameter tensors
    kept by reference).
    """

    device: str
    tensors_packed: int = 0
    tensors_offloaded: int = 0  # saves that made a new copy on the offload device
    tensors_deduplicated: int = 0  # saves served by an existing copy
    tensors_kept: int = 0  # saves kept by reference, see kept_by_reason
    tensors_restored: int = 0  # unpacks of offloaded saves
    kept_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_copied: dict[str, int] = field(default_factory=lambda: {"to_offload": 0, "back": 0})
    bytes_pinned: int = 0  # part of bytes_copied["to_offload"] that went to pinned memory
    bytes_deduplicated: int = 0  # copy bytes avoided by dedupe
    bytes_kept: int = 0  # nbytes of the tensors kept by reference (per save)
    bytes_restored: int = 0  # nbytes of the tensors handed back by unpack of offloaded saves
    bytes_held: dict[str, int] = field(default_factory=dict)
    peak_bytes_held: dict[str, int] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def _hold(self, device: str, nbytes: int) -> None:
        with self._lock:
            held = self.bytes_held.get(device, 0) + nbytes
            self.bytes_held[device] = held
            self.peak_bytes_held[device] = max(self.peak_bytes_held.get(device, 0), held)

    def _release(self, device: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_held[device] -= nbytes

    def to_dict(self) -> dict:
        """Returns: a JSON-serialisable snapshot of every counter."""
        with self._lock:
            return {
                f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
                for f in fields(self)
                if not f.name.startswith("_")
            }

    def summary(self) -> str:
        """Returns: a short multi-line, human-readable report."""
        d = self.to_dict()
        kept = ", ".join(f"{k} {v}" for k, v in sorted(d["kept_by_reason"].items())) or "none"
        held = ", ".join(f"{k} {_human(v)}" for k, v in sorted(d["bytes_held"].items()))
        peak = ", ".join(f"{k} {_human(v)}" for k, v in sorted(d["peak_bytes_held"].items()))
        return (
            f"offload -> {d['device']}: packed {d['tensors_packed']} saved tensors: "
            f"offloaded {d['tensors_offloaded']}, deduplicated {d['tensors_deduplicated']}, "
            f"kept {d['tensors_kept']} ({kept})\n"
            f"  copied {_human(d['bytes_copied']['to_offload'])} out "
            f"({_human(d['bytes_pinned'])} pinned), {_human(d['bytes_copied']['back'])} back; "
            f"dedupe avoided {_human(d['bytes_deduplicated'])}; "
            f"restored {_human(d['bytes_restored'])} in {d['tensors_restored']} unpacks; "
            f"kept {_human(d['bytes_kept'])} by reference\n"
            f"  held now: {held or 'nothing'}; peak held: {peak or 'nothing'}"
        )


class _Hold:
    """One storage (or copied span of one) kept alive by packed handles; accounted while alive."""

    __slots__ = ("stats", "device", "nbytes", "data", "pinned", "src", "version", "start",
                 "restored", "__weakref__")

    def __init__(self, stats: OffloadStats, device: str, nbytes: int, data=None, pinned=False,
                 src=None, version=0, start=0):
        self.stats, self.device, self.nbytes = stats, device, nbytes
        self.data, self.pinned = data, pinned  # (nbytes,) uint8 copy, or None when kept
        self.src, self.version, self.start = src, version, start  # dedupe key parts
        self.restored = None  # weakref to the storage last restored on the source device
        stats._hold(device, nbytes)

    def __del__(self):
        self.stats._release(self.device, self.nbytes)


class _Kept:
    """A saved tensor kept by reference, with the version it had at save time."""

    __slots__ = ("tensor", "version", "hold")

    def __init__(self, tensor: torch.Tensor, version: int, hold: _Hold | None):
        self.tensor, self.version, self.hold = tensor, version, hold


class _Moved:
    """A saved tensor offloaded as a view into a copied storage span."""

    __slots__ = ("hold", "dtype", "size", "stride", "offset", "device", "nbytes")

    def __init__(self, hold: _Hold, t: torch.Tensor, offset: int):
        self.hold, self.dtype, self.offset, self.device = hold, t.dtype, offset, t.device
        self.size, self.stride, self.nbytes = t.size(), t.stride(), t.numel() * t.element_size()


def _keep_reason(t: torch.Tensor) -> str | None:
    if (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided
            or t.is_conj() or t.is_neg() or t.is_quantized or t.device.type == "meta"):
        return "unsupported"
    if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
        return "parameter"
    return None


class _Offloader:
    """The pack/unpack pair of one context; the caches die with the context."""

    def __init__(self, target: torch.device, min_bytes: int, dedupe: bool, pin_memory: bool,
                 copy_same_device: bool, stats: OffloadStats):
        self.target, self.min_bytes, self.dedupe = target, min_bytes, dedupe
        self.pin_memory, self.copy_same_device, self.stats = pin_memory, copy_same_device, stats
        # (device, storage data_ptr) -> live _Hold; the value check makes reuse of a freed
        # address harmless (copies check src identity, kept holds pin their storage).
        self.copies: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.kept: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def pack(self, t: torch.Tensor):
        stats, nbytes = self.stats, t.numel() * t.element_size()
        reason = _keep_reason(t)
        if reason is None and (nbytes == 0 or nbytes < self.min_bytes):
            reason = "small"
        if reason is None and t.device == self.target and not self.copy_same_device:
            reason = "same_device"
        with stats._lock:
            stats.tensors_packed += 1
        if reason is not None:
            return self._keep(t, nbytes, reason)

        storage, itemsize = t.untyped_storage(), t.element_size()
        start = t.storage_offset() * itemsize  # byte span [start, end) of t in its storage
        end = start + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * itemsize
        key, version = (str(t.device), storage.data_ptr()), t._version
        hold = self.copies.get(key) if self.dedupe else None
        if (hold is not None and hold.src() is storage and hold.version == version
                and hold.start <= start and end <= hold.start + hold.nbytes
                and (start - hold.start) % itemsize == 0):
            with stats._lock:
                stats.tensors_deduplicated += 1
                stats.bytes_deduplicated += end - start
            return _Moved(hold, t, (start - hold.start) // itemsize)

        pinned = bool(self.pin_memory) and self.target.type == "cpu" and t.device.type != "cpu"
        non_blocking = pinned or (self.target.type != "cpu" and t.device.type != "cpu")
        src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)[start:end]
        buf = torch.empty(end - start, dtype=torch.uint8, device=self.target, pin_memory=pinned)
        buf.copy_(src, non_blocking=non_blocking)
        hold = _Hold(stats, str(self.target), end - start, buf, pinned,
                     weakref.ref(storage), version, start)
        if self.dedupe:
            self.copies[key] = hold
        with stats._lock:
            stats.tensors_offloaded += 1
            stats.bytes_copied["to_offload"] += end - start
            stats.bytes_pinned += (end - start) if pinned else 0
        return _Moved(hold, t, 0)

    def _keep(self, t: torch.Tensor, nbytes: int, reason: str) -> _Kept:
        stats, hold = self.stats, None
        with stats._lock:
            stats.tensors_kept += 1
            stats.kept_by_reason[reason] = stats.kept_by_reason.get(reason, 0) + 1
            stats.bytes_kept += nbytes
        if reason not in ("parameter", "unsupported"):
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            hold = self.kept.get(key)
            if hold is None:
                hold = self.kept[key] = _Hold(stats, str(t.device), storage.nbytes())
        # detach(): same data and version counter, no grad_fn. Holding a saved *output* with
        # its grad_fn makes a cycle through C++ that gc cannot collect (the graph leaks).
        return _Kept(t.detach(), t._version, hold)

    def unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, _Kept):
            t = packed.tensor
            if t._version != packed.version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by "
                    f"an inplace operation: [{t.type()} {list(t.shape)}] is at version "
                    f"{t._version}; expected version {packed.version} instead. edkm.offload kept "
                    "this saved tensor by reference and it was modified in place between forward "
                    "and backward; clone it before the in-place op, or offload with a copy.")
            return t
        hold, stats = packed.hold, self.stats
        storage = hold.restored() if hold.restored is not None else None
        if storage is None:
            if hold.data.device == packed.device:
                storage = hold.data.untyped_storage()
            else:
                storage = hold.data.to(packed.device, non_blocking=hold.pinned).untyped_storage()
                with stats._lock:
                    stats.bytes_copied["back"] += hold.nbytes
            hold.restored = weakref.ref(storage)
        with stats._lock:
            stats.tensors_restored += 1
            stats.bytes_restored += packed.nbytes
        out = torch.empty(0, dtype=packed.dtype, device=packed.device)
        return out.set_(storage, packed.offset, packed.size, packed.stride)


@contextlib.contextmanager
def offload_saved_tensors(
    device: str | torch.device = "cpu",
    min_bytes: int = DEFAULT_MIN_BYTES,
    dedupe: bool = True,
    pin_memory: bool | None = None,
    copy_same_device: bool = False,
) -> Iterator[OffloadStats]:
    """Offload the tensors autograd saves inside the block; backward may run after it exits.

    Args:
        device: where saved tensors go. Tensors already there are kept by reference
            (version-checked at unpack) unless `copy_same_device`.
        min_bytes: tensors with fewer bytes stay where they are (kept by reference).
        dedupe: serve a save from an existing copy of the same storage span at the same
            version instead of copying again.
        pin_memory: copy accelerator tensors into pinned host memory with non-blocking
            transfers. None means yes; ignored unless the source is an accelerator and
            `device` is the CPU.
        copy_same_device: snapshot same-device tensors into a private copy instead of keeping
            them by reference (the cross-device code path, on one device).
    Returns:
        A context manager yielding the live `OffloadStats`.
    """
    check_int("min_bytes", min_bytes, 0)
    target = torch.empty(0, device=device).device  # resolves "cuda" to "cuda:<current>"
    stats = OffloadStats(device=str(target))
    off = _Offloader(target, int(min_bytes), dedupe, pin_memory is not False, copy_same_device,
                     stats)
    logger.debug("offloading saved tensors to %s (min_bytes=%d, dedupe=%s, copy_same_device=%s)",
                 target, min_bytes, dedupe, copy_same_device)
    with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
        yield stats
    logger.debug("%s", stats.summary())
