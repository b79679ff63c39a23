#!/usr/bin/env bash
# Issue #24 on the GPU: the cache redesign changes no token and no speed. Run from the repository root on
# the device, with the checkouts before (.gpu_trees/old: e02b2b4) and after the core change alone
# (.gpu_trees/r24) carried beside this one (git archive <commit> kvpolicy benchmarks configs | tar -x -C ...).
#   bash benchmarks/issue24_gpu.sh tokens A B ...       # same_tokens_check on checkouts A, B, ... (old, r24, new),
#                                                       # each compared with the first
#   bash benchmarks/issue24_gpu.sh throughput A B ...   # throughput rows of checkouts A, B, ... (old, r24, new)
set -euo pipefail
ROOT=$(pwd)
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
tree() { [ "$1" = new ] && echo "$ROOT" || echo "$ROOT/.gpu_trees/$1"; }
case "$1" in
tokens)
    shift
    files=()
    for t in "$@"; do  # side by side on the one GPU (a small model; tokens, not timings, are compared)
        (cd "$(tree $t)" && PYTHONPATH=.:$ROOT/.gpu_deps python3 "$ROOT/benchmarks/same_tokens_check.py" \
            --label $t --out "$OUT/tokens_$t.pt") > "$OUT/tokens_$t.log" 2>&1 &
        files+=("$OUT/tokens_$t.pt")
    done
    wait
    python3 benchmarks/same_tokens_check.py --compare "${files[@]}" --json "$OUT/same_tokens.json" || true ;;
throughput)
    shift
    for t in "$@"; do
        (cd "$(tree $t)" && PYTHONPATH=.:$ROOT/.gpu_deps python3 benchmarks/throughput.py --shape llama2-7b \
            --policies hf-static,pyramidinfer-floor-generate --prompt-lens 512 --new-tokens 256 --batch-sizes 32 \
            --prefill-chunk 32 --json "$OUT/throughput_$t.json") > "$OUT/throughput_$t.log" 2>&1
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(sys.argv[2], r['policy'], r['batch'], \
round(r['generated_tokens_per_s'],1), round(r['decode_step_ms'],2)) for r in d['rows']]" "$OUT/throughput_$t.json" $t
    done ;;
esac
