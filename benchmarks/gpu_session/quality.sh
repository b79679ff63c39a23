#!/usr/bin/env bash
# Issues #25 and #27 quality on one lent GPU, SmolLM2-135M (the real model), all rows on the same samples:
# - #25: the RULER-style suite at kv_dtype auto/int8 (full also fp8) for full and the strongest policies at
#   compression_ratio 0.5 (tova, snapkv, kvzip_smollm2 head-ragged, the ratio form of pyramidinfer), and
#   token-dropping alone at 0.75 (tova, pyramidinfer) for the "75% of the bytes removed" comparison;
# - #27: the prune-hidden preset beside the cache-only floor preset (RULER-style suite and the passkey
#   needle task);
# each in both question positions (in the prompt, after the context), on Jane Austen's novels.
# 18 processes share the GPU at once (16 at batch 20 fit an H100 in an earlier call); each rewrites its JSON
# after every row, so a process stopped by LIMIT keeps the rows it finished.
#
#   OUT=/some/folder bash benchmarks/gpu_session/quality.sh /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Optional environment: LIMIT (seconds per process, default 470), SAMPLES (20), CONTEXT (2048), BATCH (20),
# DEVICE (cuda), DTYPE (bfloat16), NEEDLE_SIZES (large), TEXTS (austen). Needs pydantic, gguf, accelerate
# and janeaustenr's R data (R_LIBS) importable. Writes $OUT/quality.tgz (quality/<question>/*.json, *.log).
set -u
GGUF=$1
LIMIT=${LIMIT:-470} SAMPLES=${SAMPLES:-20} CONTEXT=${CONTEXT:-2048} BATCH=${BATCH:-20}
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} NEEDLE_SIZES=${NEEDLE_SIZES:-large} TEXTS=${TEXTS:-austen}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
COMMON="--model $GGUF --device $DEVICE --dtype $DTYPE --quiet --prefill-rows $BATCH --texts $TEXTS"
# name|policies|kv dtypes|extra options. compare runs full (at the model's dtype) first in every process as the
# reference, and full at each kv dtype asked: the processes are split so that each runs at most four rows.
ROWS=(
  "full|full|auto,int8,fp8|"
  "tova_snapkv|tova@0.5,snapkv@0.5|auto|"
  "tova_snapkv_int8|tova@0.5,snapkv@0.5|int8|"
  "kvzip|kvzip_smollm2@0.5|auto|"
  "kvzip_int8|kvzip_smollm2@0.5|int8|"
  "pyramidinfer|pyramidinfer@0.5|auto,int8|"
  "drop75|tova@0.75,pyramidinfer@0.75|auto|"
  "prune|pyramidinfer_54_floor,pyramidinfer_54_floor_prune|auto|--ratio 0.54"
)
for question in in-prompt after-context; do
  dir=$OUT/quality/$question
  mkdir -p "$dir"
  suite="--suite ruler --context $CONTEXT --samples $SAMPLES --question $question --batch-size $BATCH"
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name policies dtypes extra <<< "$row"
    timeout "$LIMIT" python3 -m kvpolicy compare $COMMON $suite --policies "$policies" --kv-dtype "$dtypes" $extra \
        --json "$dir/ruler_$name.json" > "$dir/ruler_$name.log" 2>&1 &
  done
  timeout "$LIMIT" python3 -m kvpolicy compare $COMMON --tasks needle --sizes "$NEEDLE_SIZES" --question $question \
      --batch-size 6 --policies pyramidinfer_54_floor,pyramidinfer_54_floor_prune \
      --json "$dir/needle_prune.json" > "$dir/needle_prune.log" 2>&1 &
done
wait
for f in "$OUT"/quality/*/*.log; do echo "== $f"; grep -c OutOfMemoryError "$f"; tail -n 1 "$f" | cut -c1-160; done
tar czf "$OUT/quality.tgz" -C "$OUT" quality && rm -rf "$OUT/quality"
