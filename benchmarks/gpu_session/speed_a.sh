#!/usr/bin/env bash
# Issue #25 and #27 speed on one lent GPU, call A (random-weight models built from config, bf16):
#  1. the decode kernel over head-ragged layers (decode_kernel_check.py --parts ragged);
#  2. #27: prefill per row at 8k and 32k tokens, Llama-3-8B shape: full, the floor preset cache-only,
#     the prune-hidden preset (prune_prefill.py);
#  3. #25: Llama-2-7B shape 512+256 through plain generate: hf-static at its largest batch on the card,
#     full + int8 and pyramidinfer_54_floor + int8 (top-p) at batches sized to fill the card.
#   OUT=/some/folder bash benchmarks/gpu_session/speed_a.sh      -> $OUT/speed_a.tgz
# Batches (environment; defaults for an H100 80GB): HF_BATCH 88 (hf-static's largest there), FULL_INT8_BATCH 256,
# FLOOR_INT8_BATCH 576. On an H200: 176 (hf-static's largest there, throughput.md), 512, 1024.
set -u
# a card of over 100 GB (an H200) takes the H200 batches unless they are set
MEM_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
if [ "${MEM_MB:-0}" -gt 100000 ]; then
  HF_BATCH=${HF_BATCH:-176} FULL_INT8_BATCH=${FULL_INT8_BATCH:-512} FLOOR_INT8_BATCH=${FLOOR_INT8_BATCH:-1024}
fi
HF_BATCH=${HF_BATCH:-88} FULL_INT8_BATCH=${FULL_INT8_BATCH:-256} FLOOR_INT8_BATCH=${FLOOR_INT8_BATCH:-576}
PARTS=${PARTS:-kernel,prefill,llama2}  # which of the three parts to run
LLAMA2_POLICIES=${LLAMA2_POLICIES:-hf-static,full-generate-top-p-int8,pyramidinfer-floor-generate-top-p-int8}
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
D=$OUT/speed_a
mkdir -p "$D"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$D/gpu.txt" 2>&1
[[ $PARTS == *kernel* ]] && timeout 90 python3 benchmarks/decode_kernel_check.py --parts ragged --json "$D/decode_kernel_ragged.json" \
    > "$D/ragged.log" 2>&1
[[ $PARTS == *prefill* ]] && timeout 200 python3 benchmarks/prune_prefill.py --shape llama3-8b --device cuda --dtype bfloat16 --prompt 8192,32768 \
    --rows 1 --reps 3 --variants full,pyramidinfer_54_floor,pyramidinfer_54_floor_prune \
    --json "$D/prune_prefill.json" > "$D/prune_prefill.log" 2>&1
[[ $PARTS == *llama2* ]] && timeout 400 python3 benchmarks/throughput.py --shape llama2-7b --prompt-lens 512 --new-tokens 256 --batch-sizes $HF_BATCH \
    --batch-for full-generate-top-p-int8=$FULL_INT8_BATCH --batch-for pyramidinfer-floor-generate-top-p-int8=$FLOOR_INT8_BATCH \
    --policies "$LLAMA2_POLICIES" --profile-batch 0 \
    --json "$D/tp_llama2.json" > "$D/tp_llama2.log" 2>&1
for f in "$D"/*.log; do echo "== $f"; tail -n 3 "$f" | cut -c1-300; done
tar czf "$OUT/speed_a.tgz" -C "$OUT" speed_a && rm -rf "$D"
