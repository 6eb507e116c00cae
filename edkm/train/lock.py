"""One run per output directory: a lock file holding the owner's pid and host.

`RunLock(dir)` creates ``dir/lock`` exclusively (``O_CREAT | O_EXCL``) with a JSON line
``{"pid", "host", "started"}`` and deletes it on exit. A second run on the same directory
gets `RunLockedError` naming the owner. A lock whose pid no longer runs on this host (a
``kill -9``) is stale: it is reclaimed with a warning. A lock from another host cannot be
checked and is never reclaimed; the message says how to remove it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = "lock"


class RunLockedError(RuntimeError):
    """Another live process owns the run directory."""


class RunLock:
    """Context manager holding ``output_dir/lock`` for the lifetime of a run.

    Args:
        output_dir: The run directory (created if missing).
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK
        self.held = False

    def acquire(self) -> "RunLock":
        """Take the lock, reclaiming a stale one; raises `RunLockedError` if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):  # second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read(self.path)
                if _alive(owner) or (not owner and _age_s(self.path) < 5.0):  # empty: being written now
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another run (pid {owner.get('pid')} on host "
                        f"{owner.get('host')!r}, lock file {self.path}); wait for it, use another --output-dir, or "
                        f"delete {self.path} if that run is gone") from None
                log.warning("reclaiming stale lock %s of pid %s on %r (that process is gone)", self.path,
                            owner.get("pid"), owner.get("host"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}: another process keeps creating it")

    def release(self) -> None:
        """Delete the lock file if this object holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as stale below only if it names no live pid


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _alive(owner: dict) -> bool:
    """Whether the lock's owner may still run. Other hosts' pids cannot be checked: alive."""
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int):
        return False
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return True  # this very process already holds it (a nested train() call): refuse
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
