"""`import edkm` sets OpenMP's wait policy before torch loads it (edkm/_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, edkm; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize("given,want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")], ids=["unset", "kept"])
def test_import_sets_passive_unless_given(given, want):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want


def test_set_before_torch_loads():
    """The policy is set by the first import of the edkm and bench packages, so that it is in
    the environment before anything loads torch (and its OpenMP runtime)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for init in (root / "edkm" / "__init__.py", root / "bench" / "__init__.py"):
        first = next(n for n in ast.parse(init.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom)))
        assert isinstance(first, ast.ImportFrom) and first.module == "edkm", init
        assert [a.name for a in first.names] == ["_threads"], init
    probe = "import sys, runpy; runpy.run_path(sys.argv[1]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe, str(root / "edkm" / "_threads.py")], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"  # the module itself loads nothing that loads torch
