#!/usr/bin/env bash
# The RULER-style quality runs of docs/benchmarks/ruler.md on one lent H200, in one call per question
# mode: kvpolicy's policies batched through benchmarks/ruler_grid.py (the image's transformers) and
# kvpress's presses at batch 1 through benchmarks/kvpress_compare.py (transformers 5.2 and kvpress from
# wheels unpacked to /tmp/kvp_site), all processes sharing the GPU at once, each file rewritten after
# every row so a process stopped by the time limit keeps what it finished.
#
#   bash benchmarks/quality_h200.sh in-prompt 0.25,0.5,0.75,0.9 [needle]
#   bash benchmarks/quality_h200.sh after-context 0.5,0.75 needle
#
# Optional environment: TAG (a name for this part, so several parts run side by side), POLICIES (the
# grid's policies; "" skips the grid), PER_GPU, BATCH, PREFILL_ROWS, PRESSES ("" skips kvpress),
# PRESS_SUITE (the presses' own context/samples/ratios options, default the grid's), KVP_GROUPS (kvpolicy's
# counterparts in kvpress's environment, batched: space-separated groups of comma-separated policies, one
# process each, merged with the presses), KVP_BATCH (their --batch-size --prefill-rows), LIMIT (seconds).
#
# Needs /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf, /tmp/kvp_site (the .gpu_kvpress wheels unpacked) and
# .gpu_deps (pydantic, gguf, accelerate, janeaustenr's R data). Writes $OUT/{ruler,kvpress}_<mode>.{json,md},
# $OUT/needle_8k_gpu.json with "needle", and $OUT/raw_<mode>.tgz (every process's file and log).
set -u
Q=$1 RATIOS=$2 NEEDLE=${3:-}
LIMIT=${LIMIT:-530} TAG=${TAG:-$1} PER_GPU=${PER_GPU:-5} BATCH=${BATCH:-80} PREFILL_ROWS=${PREFILL_ROWS:-20}
POLICIES=${POLICIES-pyramidinfer_54_floor,h2o,snapkv,pyramidkv,tova,knorm,streamingllm,random,expected_attention,kvzip_smollm2}
PRESSES=${PRESSES-snapkv pyramidkv tova knorm streamingllm expected_attention kvzip}
KVP_GROUPS=${KVP_GROUPS-} KVP_BATCH=${KVP_BATCH:-"--batch-size 40 --prefill-rows 10"}
GGUF=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
OWN=$PWD/.gpu_deps:$PWD
export R_LIBS=$PWD/.gpu_deps/R PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
SUITE="--context 2048,4096 --samples 20 --ratios $RATIOS --question $Q --dtype bfloat16"
PRESS_SUITE=${PRESS_SUITE:-$SUITE}
W=/tmp/q_$TAG; rm -rf $W; mkdir -p $W/grid $W/kvpress
[ -n "$POLICIES" ] && PYTHONPATH=$OWN timeout $LIMIT python3 benchmarks/ruler_grid.py --out $W/grid --gpus 1 \
    --per-gpu $PER_GPU --policies $POLICIES -- --model $GGUF $SUITE --batch-size $BATCH --prefill-rows $PREFILL_ROWS \
    > $W/grid.log 2>&1 &
# one kvpress_compare process in kvpress's environment, in the background: NAME (its files) and its own options
kvpress_run() {
  local name=$1; shift
  PYTHONPATH=/tmp/kvp_site:$OWN timeout $LIMIT python3 benchmarks/kvpress_compare.py --model $GGUF --suite ruler \
      $PRESS_SUITE --question $Q --device cuda --no-press-baseline "$@" --json $W/kvpress/$name.json \
      > $W/kvpress/$name.log 2>&1 &
}
for p in $PRESSES; do kvpress_run press_$p --kvpolicy '' --presses $p; done
i=0
for g in $KVP_GROUPS; do i=$((i + 1)); kvpress_run kvpolicy_$i $KVP_BATCH --kvpolicy $g --presses ''; done
if [ -n "$NEEDLE" ]; then
  PYTHONPATH=$OWN timeout $LIMIT python3 benchmarks/needle_probe.py --json $W/needle_8k_gpu.json --hay-tokens 7700 \
      --count 24 --model $GGUF --device cuda --dtype bfloat16 full pyramidinfer_54_floor \
      'pyramidinfer_54_floor:{"head_aggregation":"kv_head"}' 'pyramidinfer_54_floor:{"prefill_recent_ratio":0.008}' \
      'pyramidinfer_54_floor:{"head_aggregation":"kv_head","prefill_recent_ratio":0.008}' \
      'pyramidinfer_54_floor:{"pool_kernel":15}' 'snapkv:{"compression_ratio":0.54}' > $W/needle.log 2>&1 &
fi
wait
ls $W/grid/shard*.json > /dev/null 2>&1 && PYTHONPATH=$OWN python3 -m kvpolicy.evaluation.ruler.report \
    $W/grid/shard*.json --json $OUT/ruler_$TAG.json --markdown > $OUT/ruler_$TAG.md 2> $W/report.log
ls $W/kvpress/*.json > /dev/null 2>&1 && PYTHONPATH=/tmp/kvp_site:$OWN python3 benchmarks/kvpress_compare.py \
    --merge $W/kvpress/*.json --json $OUT/kvpress_$TAG.json --out $OUT/kvpress_$TAG.md > $W/merge.log 2>&1
[ -f $W/needle_8k_gpu.json ] && cp $W/needle_8k_gpu.json $OUT/
tar czf $OUT/raw_$TAG.tgz -C /tmp q_$TAG
tail -n 3 $W/grid.log $W/kvpress/*.log $W/report.log $W/merge.log $W/needle.log 2>/dev/null | cut -c1-300
