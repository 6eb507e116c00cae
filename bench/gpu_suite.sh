#!/usr/bin/env bash
# The GPU suite in one command (see bench/gpu_suite.py for the steps):
#   bash bench/gpu_suite.sh [--dry-run] [OUT_DIR] [-- extra flags for python -m bench.gpu_suite]
# OUT_DIR defaults to $OUT (the GPU machine's return folder), else bench/results/gpu-suite.
# Installs this checkout with `pip install --no-deps -e .` (the GPU machine has torch,
# triton, transformers, accelerate, safetensors and pytest, and no network); --dry-run
# skips the install and runs the same steps at tiny shapes on CPU. A failing step is
# recorded in summary.json and the suite goes on; the exit code says whether all passed.
set -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); shift; fi
DIR=${1:-${OUT:-bench/results/gpu-suite}}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$DIR"
{
    echo "[suite] $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) -> $DIR"
    if [ ${#DRY[@]} -eq 0 ]; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "[suite] install: FAILED (rc $?)"
    fi
    "$PY" -m bench.gpu_suite "${DRY[@]}" --out-dir "$DIR" "$@"
} 2>&1 | tee "$DIR/suite.log"
