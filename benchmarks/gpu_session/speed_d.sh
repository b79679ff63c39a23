#!/usr/bin/env bash
# Issue #25 / #27 on one lent GPU (random-weight bf16 models), the 2026-12-08 session's call D:
#  1. the decode kernel, rectangle and head-ragged (decode_kernel_check.py: errors, timings, ragged); at commit
#     3cad35f (where it ran on 2026-12-08) the check also timed 8-bit codes made float16 by bit arithmetic
#     against the conversion instructions: no gain (0.93-1.08x), so that reading was reverted;
#  2. #27: prefill per row at 8k and 32k, Llama-3-8B shape, after the leaner attention scoring
#     (attention_signals.py): full, the floor preset cache-only, the prune-hidden preset.
#   OUT=/some/folder bash benchmarks/gpu_session/speed_d.sh      -> $OUT/speed_d.tgz
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
D=$OUT/speed_d
mkdir -p "$D"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$D/gpu.txt" 2>&1
timeout ${KERNEL_LIMIT:-200} python3 benchmarks/decode_kernel_check.py --parts errors,timings,ragged \
    --json "$D/decode_kernel_bits.json" > "$D/kernel.log" 2>&1
python3 - "$D/decode_kernel_bits.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("copy TB/s", r["meta"].get("copy_bandwidth_tb_s"))
for e in r["errors"]:
    print("err", e["kv_dtype"], e["shape"], f'{e["kernel_max_abs_err"]:.4f}')
for part in ("timings", "ragged"):
    for t in r[part]:
        print(part[:4], t["shape"][:24], t["kv_dtype"], f'{t["kernel_us"]:.1f}us', f'{t["kernel_x_floor"]:.2f}x')
PY
[ "${PREFILL:-1}" = 1 ] && timeout ${PREFILL_LIMIT:-230} python3 benchmarks/prune_prefill.py --shape llama3-8b --device cuda \
    --dtype bfloat16 --prompt 8192,32768 --rows 1 --reps 3 \
    --variants full,pyramidinfer_54_floor,pyramidinfer_54_floor_prune --json "$D/prune_prefill.json" \
    > "$D/prune_prefill.log" 2>&1
tail -n 8 "$D/prune_prefill.log" | cut -c1-300
tar czf "$OUT/speed_d.tgz" -C "$OUT" speed_d && rm -rf "$D"
