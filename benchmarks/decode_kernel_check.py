"""The Triton decode kernel on a GPU: its error against the float32 reference, its time against the bytes floor.

Part 1, error: random frozen-layer buffers (bf16 queries; K/V as stored at ``auto``, ``int8``, ``fp8``; some
slots dropped, left padding, GQA) through ``decode_attention.kernel_attention`` and through today's SDPA
route (dequantize the buffer, ``masks.allowed``, ``gqa_attention.grouped_attention``), each against
``decode_attention.reference`` (float32): the largest absolute error of each, per dtype.

Part 2, time: one decode step's attention for one layer at serving shapes, each route captured in a CUDA
graph of ``--reps`` calls and replayed (launch overhead out), against the floor: the bytes the kernel must
read (stored K/V of the filled slots, their positions) at the card's copy bandwidth, measured in the same
run (a ``--copy-gib`` device-to-device copy: 2 x bytes / time).

Part 2b (``--parts ragged``), head-ragged layers: each (row, KV head) keeps its own count, stored as flat
segments (the frozen ragged kind's layout); the kernel's ``RAGGED`` mode against the reference over the
padded rectangle, and its time against the floor of the bytes the segments hold.

Part 3, end to end: plain ``model.generate`` (compiled by transformers, CUDA graphs) on compiled_path_check's
small random model in bf16, ``decode_kernel="triton"`` against ``"sdpa"`` per kv_dtype: the share of
generated tokens that agree (bf16 rounding differs between the two, so near ties may part) and the time.

    python benchmarks/decode_kernel_check.py --json docs/benchmarks/decode_kernel_check.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))
import compiled_path_check as cpc  # noqa: E402 - the benchmarks' shared model and batch

import kvpolicy  # noqa: E402
from kvpolicy.core import decode_attention, gqa_attention, masks  # noqa: E402
from kvpolicy.core.layers import Fp8Codec, Int8Codec, KVCodec  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402

CODECS = {"bf16": KVCodec(), "int8": Int8Codec(), "fp8": Fp8Codec()}
#: (label, batch, query heads, KV heads, head dim, filled slots, capacity)
SHAPES = [
    ("llama2-7b 512+256, batch 64", 64, 32, 32, 128, 768, 800),
    ("llama2-7b floor (~208 kept), batch 576", 576, 32, 32, 128, 208, 464),
    ("llama3-8b 8k+256, batch 16", 16, 32, 8, 128, 8448, 8704),
    ("smollm2 9/3 heads, 4k, batch 32", 32, 9, 3, 64, 4096, 4352),
]


def buffers(b, hq, hkv, d, filled, capacity, codec, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    query = torch.randn(b, hq, 1, d, generator=gen, device=device).bfloat16()
    keys = codec.encode(torch.randn(b, hkv, capacity, d, generator=gen, device=device).bfloat16() * 2)
    values = codec.encode(torch.randn(b, hkv, capacity, d, generator=gen, device=device).bfloat16())
    qpos = filled + 100
    pos = torch.arange(qpos - filled + 1, qpos + 1, device=device).expand(b, hkv, filled).clone()
    pos[torch.rand(pos.shape, generator=gen, device=device) < 0.1] = -1
    pos[..., -1] = qpos
    pos = torch.cat([pos, pos.new_full((b, hkv, capacity - filled), -1)], -1)
    pad = torch.randint(0, filled // 4, (b,), generator=gen, device=device) + (qpos - filled + 1)
    slot = torch.tensor([filled], device=device)
    next_pos = torch.tensor([qpos + 1], device=device)
    return query, keys, values, pos, pad, slot, next_pos, qpos


def sdpa_route(query, keys, values, pos, pad, next_pos, codec):
    """What a frozen layer's attention did before the kernel: the whole buffer dequantized, then SDPA."""
    k, v = codec.decode(keys, query.dtype), codec.decode(values, query.dtype)
    allowed = masks.allowed(pos, pad, (next_pos - 1).view(1, 1, 1, 1), None)
    return gqa_attention.grouped_attention(query, k, v, allowed)


def graph_time(fn, reps: int) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph of ``reps`` calls (median of 5 replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[2]


def copy_bandwidth(gib: float) -> float:
    n = int(gib * 2**30)
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = graph_time(lambda: b.copy_(a), 5)
    return 2 * n / t


def errors() -> list[dict]:
    rows = []
    for name, codec in CODECS.items():
        for seed, (b, hq, hkv, d, filled, cap) in enumerate([(4, 32, 8, 128, 1000, 1100), (3, 9, 3, 64, 333, 400),
                                                              (2, 32, 32, 128, 70, 80)]):
            query, keys, values, pos, pad, slot, next_pos, qpos = buffers(b, hq, hkv, d, filled, cap, codec, seed)
            want = decode_attention.reference(query, keys, values, pos, pad, filled, qpos, codec, None, None).float()
            got = decode_attention.kernel_attention(query, keys, values, pos, pad, slot, next_pos, codec, None, None)
            old = sdpa_route(query, keys, values, pos, pad, next_pos, codec)
            rows.append({"kv_dtype": name, "shape": [b, hq, hkv, d, filled],
                         "kernel_max_abs_err": (got.float() - want).abs().max().item(),
                         "sdpa_max_abs_err": (old.float() - want).abs().max().item(),
                         "reference_max_abs": want.abs().max().item()})
            print(rows[-1], flush=True)
    return rows


def timings(reps: int, bandwidth: float) -> list[dict]:
    rows = []
    for label, b, hq, hkv, d, filled, cap in SHAPES:
        for name, codec in CODECS.items():
            query, keys, values, pos, pad, slot, next_pos, _ = buffers(b, hq, hkv, d, filled, cap, codec)
            width = keys.shape[-1] * keys.element_size()
            read = b * hkv * filled * (2 * width + pos.element_size())
            args = (query, keys, values, pos, pad, slot, next_pos, codec)
            kernel = graph_time(functools.partial(decode_attention.kernel_attention, *args, None, None), reps)
            sdpa = graph_time(functools.partial(sdpa_route, *args[:5], next_pos, codec), reps)
            floor = read / bandwidth
            rows.append({"shape": label, "kv_dtype": name, "bytes_read": read, "floor_us": floor * 1e6,
                         "kernel_us": kernel * 1e6, "kernel_x_floor": kernel / floor, "sdpa_us": sdpa * 1e6,
                         "sdpa_x_floor": sdpa / floor,
                         "splits": decode_attention.splits_for(b * hkv, cap, query.device)})
            print(rows[-1], flush=True)
            del query, keys, values, pos, args
    return rows


def ragged_buffers(b, hq, hkv, d, filled, codec, seed=0, device="cuda"):
    """A head-ragged layer as the frozen ragged kind stores it: (row, KV head) ``(b, h)`` keeps its own
    count, uniform in [filled / 5, filled] (kvzip's global allocation leaves counts this uneven), its
    entries one after another in flat ``[N, W]`` buffers; and the same tokens as a rectangle padded to the
    longest head (position -1), for the reference."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.randint(filled // 5, filled + 1, (b, hkv), generator=gen, device=device)
    lengths[0, 0] = filled  # the rectangle is as wide as the longest head
    qpos = filled + 100
    query = torch.randn(b, hq, 1, d, generator=gen, device=device).bfloat16()
    rect_k = torch.randn(b, hkv, filled, d, generator=gen, device=device).bfloat16() * 2
    rect_v = torch.randn(b, hkv, filled, d, generator=gen, device=device).bfloat16()
    column = torch.arange(filled, device=device)
    # each head's kept tokens: its last ``length`` positions up to the query, a tenth of them dropped
    rect_pos = (qpos - lengths[..., None] + 1 + column).where(column < lengths[..., None], -1)
    dropped = (torch.rand(rect_pos.shape, generator=gen, device=device) < 0.1) & (column < lengths[..., None] - 1)
    rect_pos[dropped] = -1
    pad = torch.zeros(b, dtype=torch.long, device=device)
    live = column < lengths[..., None]  # [B, H, L]: the entries a segment stores
    flat_k, flat_v, flat_pos = codec.encode(rect_k[live]), codec.encode(rect_v[live]), rect_pos[live].contiguous()
    start = torch.cumsum(lengths.flatten(), 0).view(b, hkv) - lengths
    slot = torch.tensor([1], device=device)  # entries of segment (b, h): start up to end + slot
    end = start + lengths - 1
    rect = (query, codec.encode(rect_k), codec.encode(rect_v), rect_pos, pad, qpos)
    return query, flat_k, flat_v, flat_pos, pad, slot, torch.tensor([qpos + 1], device=device), (start, end), rect


def ragged(reps: int, bandwidth: float) -> list[dict]:
    """The kernel over head-ragged int8/fp8/bf16 layers: error against the reference over the padded
    rectangle, time against the floor of the bytes the segments hold (and the padded rectangle's time)."""
    rows = []
    for label, b, hq, hkv, d, filled, _ in SHAPES:
        for name, codec in CODECS.items():
            query, k, v, pos, pad, slot, next_pos, segments, rect = ragged_buffers(b, hq, hkv, d, filled, codec)
            rq, rk, rv, rpos, rpad, qpos = rect
            got = decode_attention.kernel_attention(query, k, v, pos, pad, slot, next_pos, codec, None, None,
                                                    segments)
            want = decode_attention.reference(rq, rk, rv, rpos, rpad, filled, qpos, codec, None, None).float()
            width = k.shape[-1] * k.element_size()
            read = k.shape[0] * (2 * width + pos.element_size())
            kernel = graph_time(functools.partial(decode_attention.kernel_attention, query, k, v, pos, pad, slot,
                                                  next_pos, codec, None, None, segments), reps)
            rect_slot = torch.tensor([filled], device=query.device)
            padded = graph_time(functools.partial(decode_attention.kernel_attention, rq, rk, rv, rpos, rpad,
                                                  rect_slot, next_pos, codec, None, None), reps)
            floor = read / bandwidth
            rows.append({"shape": label, "kv_dtype": name, "layout": "head-ragged segments",
                         "kept_share_of_rectangle": k.shape[0] / (b * hkv * filled),
                         "kernel_max_abs_err": (got.float() - want).abs().max().item(),
                         "bytes_read": read, "floor_us": floor * 1e6, "kernel_us": kernel * 1e6,
                         "kernel_x_floor": kernel / floor, "padded_rectangle_us": padded * 1e6})
            print(rows[-1], flush=True)
            del query, k, v, pos, rect, rq, rk, rv
    return rows


def end_to_end(steps: int) -> list[dict]:
    model = cpc.build_model("small", "cuda", torch.bfloat16)
    inputs = cpc.make_batch(16, 300, 600, model.config.vocab_size, 0, "cuda")
    rows = []
    for kv_dtype in ("auto", "int8", "fp8"):
        out = {}
        for kernel in ("sdpa", "triton"):
            for warm in (True, False):
                cache = kvpolicy.make_cache("pyramidinfer_54_floor", kv_dtype=kv_dtype, decode_kernel=kernel)
                torch.cuda.synchronize()
                start = time.perf_counter()
                gen = cpc.greedy_generate(model, inputs, cache, 8 if warm else steps)
                torch.cuda.synchronize()
                out[kernel] = gen, time.perf_counter() - start
        width = inputs["input_ids"].shape[1]
        a, b = out["sdpa"][0].sequences[:, width:], out["triton"][0].sequences[:, width:]
        first = [int((a[r] != b[r]).nonzero()[0]) if (a[r] != b[r]).any() else steps for r in range(a.shape[0])]
        rows.append({"kv_dtype": kv_dtype, "tokens_equal_share": (a == b).float().mean().item(),
                     "first_step_apart_median": sorted(first)[len(first) // 2], "sdpa_s": out["sdpa"][1],
                     "triton_s": out["triton"][1], "steps": steps})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--parts", default="errors,timings,end_to_end")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    parts = args.parts.split(",")
    bandwidth = copy_bandwidth(args.copy_gib)
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    result = {"meta": run_meta(device=torch.cuda.get_device_name(), copy_bandwidth_tb_s=bandwidth / 1e12),
              "errors": errors() if "errors" in parts else [],
              "timings": timings(args.reps, bandwidth) if "timings" in parts else [],
              "ragged": ragged(args.reps, bandwidth) if "ragged" in parts else [],
              "end_to_end": end_to_end(args.steps) if "end_to_end" in parts else []}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(math.isfinite(r["kernel_max_abs_err"]) for r in result["errors"] + result["ragged"]) else 1


if __name__ == "__main__":
    sys.exit(main())
