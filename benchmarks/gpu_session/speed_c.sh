#!/usr/bin/env bash
# Issue #27 / #25 throughput at 8192 + 256 on the Llama-3-8B shape (random bf16 weights), one lent GPU,
# plain model.generate (top-p for the kvpolicy rows; hf-static greedy), prefill 8 rows at a time.
#   PART=1: #27's rows: hf-static at its largest batch, full, the floor preset (cache-only) and
#           the prune-hidden preset in bf16 at batches sized to fill the card
#           (hf-static: 64 generated tokens timed on a cache sized for 256, the whole call projected)
#   PART=2: #25's rows: the prune-hidden preset and the floor preset with int8 KV
#   OUT=/some/folder PART=1 bash benchmarks/gpu_session/speed_c.sh      -> $OUT/speed_c$PART.tgz
# Batches (environment; defaults for an H100 80GB): HF 16, FULL 48, FLOOR 112, PRUNE 112, PRUNE_INT8 200,
# FLOOR_INT8 160. On an H200: 32 (hf-static's largest there, throughput.md run f3), 96, 200, 200, 320, 320.
set -u
# a card of over 100 GB (an H200) takes the H200 batches unless they are set
MEM_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
if [ "${MEM_MB:-0}" -gt 100000 ]; then
  HF=${HF:-32} FULL=${FULL:-96} FLOOR=${FLOOR:-200} PRUNE=${PRUNE:-200} PRUNE_INT8=${PRUNE_INT8:-320} FLOOR_INT8=${FLOOR_INT8:-320}
fi
HF=${HF:-16} FULL=${FULL:-48} FLOOR=${FLOOR:-112} PRUNE=${PRUNE:-112} PRUNE_INT8=${PRUNE_INT8:-200}
FLOOR_INT8=${FLOOR_INT8:-160}
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PART=${PART:-1} TP_LIMIT=${TP_LIMIT:-560}  # seconds for the throughput process (it saves every row)
D=$OUT/speed_c$PART
mkdir -p "$D"
COMMON="--shape llama3-8b --prompt-lens 8192 --new-tokens 256 --prefill-chunk 8 --profile-batch 0"
if [ "$PART" = 1 ]; then
  timeout "$TP_LIMIT" python3 benchmarks/throughput.py $COMMON --hf-static-steps 64 --batch-sizes $HF --batch-for full-generate-top-p=$FULL \
      --batch-for pyramidinfer-floor-generate-top-p=$FLOOR --batch-for pyramidinfer-floor-prune-generate-top-p=$PRUNE \
      --policies hf-static,pyramidinfer-floor-prune-generate-top-p,pyramidinfer-floor-generate-top-p,full-generate-top-p \
      --json "$D/tp_8k_bf16.json" > "$D/tp.log" 2>&1
else
  timeout "$TP_LIMIT" python3 benchmarks/throughput.py $COMMON --batch-sizes $PRUNE_INT8 \
      --batch-for pyramidinfer-floor-generate-top-p-int8=$FLOOR_INT8 \
      --policies pyramidinfer-floor-prune-generate-top-p-int8,pyramidinfer-floor-generate-top-p-int8 \
      --json "$D/tp_8k_int8.json" > "$D/tp.log" 2>&1
fi
tail -n 5 "$D/tp.log" | cut -c1-400
tar czf "$OUT/speed_c$PART.tgz" -C "$OUT" "speed_c$PART" && rm -rf "$D"
