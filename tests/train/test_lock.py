"""One run per output directory: the lock refuses a live owner and reclaims a dead one."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edkm.train.config import load_config
from edkm.train.lock import RunLock, RunLockedError
from edkm.train.loop import train

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _write_lock(d: Path, pid: int, host: str | None = None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": 0}))


def test_second_holder_is_refused_and_release_frees_it(tmp_path):
    with RunLock(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host '{socket.gethostname()}'"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / "lock").exists()
    RunLock(tmp_path).acquire().release()


def test_a_live_process_elsewhere_blocks_train(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, child.pid)
        cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "optim.max_steps=1"])
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {child.pid}"):
            train(cfg)
        assert json.loads((tmp_path / "lock").read_text())["pid"] == child.pid  # not taken over
    finally:
        child.kill()
        child.wait()


def test_stale_lock_of_a_dead_pid_is_reclaimed_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    with caplog.at_level(logging.WARNING, logger="edkm.train.lock"):
        with RunLock(tmp_path) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"reclaiming stale lock {tmp_path / 'lock'} of pid {dead.pid}" in caplog.text


def test_lock_from_another_host_is_never_reclaimed(tmp_path):
    _write_lock(tmp_path, 1, host="some-other-host")
    with pytest.raises(RunLockedError, match="on host 'some-other-host'.*delete .*lock"):
        RunLock(tmp_path).acquire()
