#!/usr/bin/env bash
# The default test suite (tiny random models, no downloads). Add `-m slow` for the tests on real SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -m "not slow and not gpu" "$@"
