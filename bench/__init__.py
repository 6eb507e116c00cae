"""Benchmarks of edkm (see bench/README.md)."""

from edkm import _threads  # noqa: F401  (OMP_WAIT_POLICY before torch loads OpenMP)
