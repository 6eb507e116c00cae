"""Shared test setup: Triton's interpreter on CPU-only machines, fixed seeds, the tolerance module.

TRITON_INTERPRET must be set before triton is first imported (kernels are built for the
interpreter at import), so it is set here, before any test module is collected.
PYTHONFAULTHANDLER is set for the processes tests spawn (the gloo ranks): a rank that dies
of a signal (SIGABRT, SIGSEGV) then prints the Python stack of every thread to stderr,
which pytest shows with the failure (pytest's own faulthandler covers this process only).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state (tests that need others seed their own)."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run the test with one intra-op torch thread (peers that compare numbers across runs)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
