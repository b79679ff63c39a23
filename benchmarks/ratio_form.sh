#!/usr/bin/env bash
# Issue #26 item 3 on one lent GPU: which shape should PyramidInfer's ratio form
# (`PyramidCache(compression_ratio=r)`) take? PyramidInfer variants at compression_ratio 0.5 beside the
# strongest other policies (tova, snapkv, kvzip_smollm2), all on the same samples, in four conditions:
# two haystacks (Jane Austen's novels, the Python docs) x two question positions (in the prompt, after
# the context). Per condition: the RULER-style suite (4 needle tasks, 2k tokens, SAMPLES per task) in
# three processes (policies split), and the passkey needle task (`--sizes large`: 12 samples, 1k-6k
# tokens) in one. All 16 processes share the GPU at once; each rewrites its JSON after every row, so a
# process stopped by LIMIT keeps the rows it finished.
#
#   OUT=/some/folder bash benchmarks/ratio_form.sh /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Optional environment: LIMIT (seconds per process, default 470), SAMPLES (default 20), BATCH (20),
# PREFILL_ROWS (20). (A first call ran 20 processes at batch 40: 8 of them ran out of GPU memory.) Needs pydantic, gguf, accelerate (and, for the novels, janeaustenr's R data under
# R_LIBS) importable: on the lent GPU, `.gpu_deps` on PYTHONPATH. Writes $OUT/ratio_form.tgz: ratio_form/<condition>/*.json
# and *.log (one file, as the device tool returns few files).
set -u
GGUF=$1
LIMIT=${LIMIT:-470} SAMPLES=${SAMPLES:-20} BATCH=${BATCH:-20} PREFILL_ROWS=${PREFILL_ROWS:-20}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
V=benchmarks/ratio_form
# the ratio form as it was (the depth preset PyramidCache picks for <= 32 layers), the floor preset, variants
PYRAMID_A="pyramidinfer_llama2_7b@0.5,pyramidinfer_54_floor@0.5,$V/floor_voters1.yaml@0.5,$V/ref_pool7.yaml@0.5"
PYRAMID_B="$V/floor_decay05.yaml@0.5,$V/floor_voters5.yaml@0.5,$V/floor_voters1_decay05.yaml@0.5"
PYRAMID_B="$PYRAMID_B,$V/ref_voters1_pool7.yaml@0.5"
OTHERS="tova@0.5,snapkv@0.5,kvzip_smollm2@0.5"
ALL="$PYRAMID_A,$PYRAMID_B,$OTHERS"
COMMON="--model $GGUF --device cuda --dtype bfloat16 --quiet --prefill-rows $PREFILL_ROWS"
for texts in austen python-docs; do
  for question in in-prompt after-context; do
    dir=$OUT/ratio_form/${texts}_${question}
    mkdir -p "$dir"
    suite="--suite ruler --context 2048 --samples $SAMPLES --texts $texts --question $question --batch-size $BATCH"
    i=0
    for policies in "$PYRAMID_A" "$PYRAMID_B" "$OTHERS"; do
      i=$((i + 1))
      timeout "$LIMIT" python3 -m kvpolicy compare $COMMON $suite --policies "$policies" \
          --json "$dir/ruler_$i.json" > "$dir/ruler_$i.log" 2>&1 &
    done
    timeout "$LIMIT" python3 -m kvpolicy compare $COMMON --tasks needle --sizes large --texts $texts \
        --question $question --batch-size 6 --policies "$ALL" --json "$dir/needle.json" > "$dir/needle.log" 2>&1 &
  done
done
wait
for f in "$OUT"/ratio_form/*/*.log; do echo "== $f"; grep -c OutOfMemoryError "$f"; tail -n 1 "$f" | cut -c1-160; done
tar czf "$OUT/ratio_form.tgz" -C "$OUT" ratio_form && rm -rf "$OUT/ratio_form"
