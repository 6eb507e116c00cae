#!/usr/bin/env bash
# Install (first time), lint with ruff, and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TRITON_INTERPRET=1
.venv/bin/ruff check .   # lint first: configured in pyproject.toml, the tree is kept clean
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a broken suite here, never a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
