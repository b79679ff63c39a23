"""Is the 8-bit decode kernel slow because its rows are only 4-byte aligned? One GPU run that answers it.

An int8/fp8 layer stores each vector as ``D`` code bytes and a 4-byte scale: rows of ``D + 4`` bytes,
so a row starts on a 4-byte boundary and the kernel reads it in 4-byte words (docs/benchmarks/
decode_kernel.md: 1.8-2.7x its bytes floor at head_dim 128, 6-8x at 64, where bf16 runs at 0.7-1.0x).
Here the same codes and scales are placed in rows padded to ``D + 16`` and ``D + 64`` bytes (the
kernel takes any row stride): with ``D + 64`` the stride in words is a multiple of 16, which Triton
sees and then loads four words (16 bytes) at a time. Each layout's time is set against the floor of
the **useful** bytes (``D + 4`` per vector, as stored today, plus positions) at the card's copy
bandwidth: if the padded rows come near 1x, the load width is the cause, and storing codes and
scales apart (aligned code rows) is the fix; if not, the cause lies in the kernel's arithmetic.

    python benchmarks/kernel_row_alignment.py --json $OUT/kernel_row_alignment.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))
from decode_kernel_check import CODECS, SHAPES, buffers, copy_bandwidth, graph_time  # noqa: E402

from kvpolicy.core import decode_attention  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402

PADS = (4, 16, 64)  # bytes after the D codes in a row: as stored, 16-byte rows, 16-word-multiple rows


def padded(stored: torch.Tensor, extra: int) -> torch.Tensor:
    """``stored`` ``[..., D + 4]`` placed at the start of rows ``D + extra`` bytes apart (a strided view)."""
    d = stored.shape[-1] - 4
    room = stored.new_zeros(*stored.shape[:-1], d + extra)
    room[..., : d + 4] = stored
    return room[..., : d + 4]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bandwidth = copy_bandwidth(2.0)
    rows = []
    for label, b, hq, hkv, d, filled, cap in SHAPES:
        for name in ("int8", "fp8"):
            codec = CODECS[name]
            query, keys, values, pos, pad, slot, next_pos, qpos = buffers(b, hq, hkv, d, filled, cap, codec)
            useful = b * hkv * filled * (2 * (d + 4) + pos.element_size())
            want = decode_attention.reference(query, keys, values, pos, pad, filled, qpos, codec, None, None)
            for extra in PADS:
                k, v = padded(keys, extra), padded(values, extra)
                call = functools.partial(decode_attention.kernel_attention, query, k, v, pos, pad, slot, next_pos,
                                         codec, None, None)
                err = (call().float() - want.float()).abs().max().item()
                t = graph_time(call, args.reps)
                rows.append({"shape": label, "kv_dtype": name, "row_bytes": d + extra, "stride_words": (d + extra) // 4,
                             "kernel_us": t * 1e6, "useful_floor_us": useful / bandwidth * 1e6,
                             "x_useful_floor": t / (useful / bandwidth), "max_abs_err": err})
                print(f"{label[:28]:28} {name} row {d + extra:3d} B: {t * 1e6:7.1f} us "
                      f"{rows[-1]['x_useful_floor']:.2f}x floor, err {err:.4f}", flush=True)
                del k, v
            del query, keys, values, pos
    if args.json:
        args.json.write_text(json.dumps({"meta": run_meta(device=torch.cuda.get_device_name(),
                                                          copy_bandwidth_tb_s=bandwidth / 1e12),
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
