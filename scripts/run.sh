#!/usr/bin/env bash
# The main job: install (first time), then fine-tune SmolLM2-135M with 4-bit DKM on the
# default corpus, print perplexity before/after and the exported size.
# Extra args go to `edkm train` (e.g. --max-steps 5 dkm.bits=3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/edkm train --config configs/smollm2-135m-4bit.yaml "$@"
