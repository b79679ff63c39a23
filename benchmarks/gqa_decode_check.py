"""Decode attention on GQA models: the KV-expanding route against kvpolicy's grouped routes, on a GPU.

Two measurements, one process:

1. one masked decode-attention call alone (CUDA events, median of ``--reps``): transformers' route with
   a mask (KV heads expanded to the query heads, then masked SDPA), kvpolicy's two routes
   (``kvpolicy.core.gqa_attention.grouped_attention``: folded, and SDPA's ``enable_gqa=True``), with the
   bytes of keys and values over the measured copy bandwidth as the floor;
2. inside the model: ``generate_static`` (compiled, CUDA graphs) per policy and ``--routes``: kvpolicy's
   default (``auto``: SDPA's ``enable_gqa`` on CUDA), the folded route, and ``expanded``, the route before
   this change (every layer through the model's own attention function with the mask expanded to the query
   heads), reporting ms per compiled decode step, the step's
   bandwidth floor (weights + KV bytes read per step over the copy bandwidth), and whether the
   generated tokens agree.

    python benchmarks/gqa_decode_check.py --shape llama3-8b --batch 16 --prompt 8192 --steps 32 \\
        --json docs/benchmarks/raw/gqa_decode_check.json

``--shape tiny`` is a CPU dry run (no timing of note; the suite runs it so the script cannot rot).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import SHAPES, build_model  # noqa: E402  (the model shapes the throughput benchmark uses)

from kvpolicy.core import gqa_attention  # noqa: E402
from kvpolicy.generation import generate_static  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402


def timed(fn, reps: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10, device)
    return 2 * n * 2 / (ms / 1e3)  # src and dst are freed on return


def attention_alone(args, device: str, dtype: torch.dtype, bandwidth: float) -> list[dict]:
    b, hq, hkv, d, length = args.attn_batch, args.attn_heads, args.attn_kv_heads, 128, args.attn_slots
    if args.shape == "tiny":
        b, hq, hkv, d, length = 2, 4, 2, 16, 50
    g = hq // hkv
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=gen)
    key = torch.randn(b, hkv, length, d, device=device, dtype=dtype, generator=gen)
    value = torch.randn(b, hkv, length, d, device=device, dtype=dtype, generator=gen)
    allowed = torch.rand(b, hkv, 1, length, device=device, generator=gen) > 0.1  # a tenth of the slots invalid
    allowed[..., 0] = True
    per_head = allowed.repeat_interleave(g, dim=1)

    def expanded():  # transformers' sdpa_attention_forward with a mask on CUDA: repeat_kv, then SDPA
        k = key[:, :, None].expand(b, hkv, g, length, d).reshape(b, hq, length, d)
        v = value[:, :, None].expand(b, hkv, g, length, d).reshape(b, hq, length, d)
        return F.scaled_dot_product_attention(query, k, v, attn_mask=per_head).transpose(1, 2)

    def folded():
        return gqa_attention.grouped_attention(query, key, value, allowed, route="fold")

    def kvpolicy_enable_gqa():  # the CUDA route, with its per-query-head mask built inside the timing
        return gqa_attention.grouped_attention(query, key, value, allowed, route="enable_gqa")

    def enable_gqa():
        return F.scaled_dot_product_attention(query, key, value, attn_mask=per_head, enable_gqa=True).transpose(1, 2)

    ref = expanded().float()
    floor_ms = 2 * key.numel() * key.element_size() / bandwidth * 1e3
    rows = []
    for name, fn in (("expanded (transformers, masked)", expanded), ("folded (kvpolicy, fold)", folded),
                     ("sdpa enable_gqa, mask given", enable_gqa), ("kvpolicy enable_gqa", kvpolicy_enable_gqa)):
        try:
            out = fn().float()
            err = ((out - ref).norm() / ref.norm()).item()
            ms = timed(fn, args.reps, device)
        except RuntimeError as exc:  # a backend that refuses the combination
            rows.append({"route": name, "error": str(exc).splitlines()[0]})
            continue
        rows.append({"route": name, "ms": round(ms, 4), "floor_ms": round(floor_ms, 4),
                     "x_floor": round(ms / floor_ms, 2), "rel_err_vs_expanded": err})
    return rows


def in_model(args, device: str, dtype: torch.dtype, bandwidth: float) -> list[dict]:
    model = build_model(args.shape, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, args.batch, 4):  # every fourth row left-padded by a few tokens
        mask[row, : 3 + row % 7] = 0
        ids[row, : 3 + row % 7] = 0
    ids, mask = ids.to(device), mask.to(device)
    compile_opt: bool | dict = True if device == "cuda" else False
    rows = []
    real_applies, real_grouped = gqa_attention.applies, gqa_attention.grouped_attention
    for policy in args.policies:
        first_tokens = None
        for route in args.routes:
            if route == "expanded":  # every layer through the model's own function with the expanded mask
                gqa_attention.applies = lambda impl, kwargs: False
            elif route != "auto":
                gqa_attention.grouped_attention = functools.partial(real_grouped, route=route)
            try:
                for _ in range(2):  # the first call compiles and captures; the second is timed
                    profile: dict = {}
                    out = generate_static(model, ids, mask, policy=policy, max_new_tokens=args.steps,
                                          prefill_batch_size=args.prefill_rows, compile=compile_opt, profile=profile)
            finally:
                gqa_attention.applies, gqa_attention.grouped_attention = real_applies, real_grouped
            kv = out.cache.memory_bytes(allocated=False)
            steps = profile.get("steps", 0) or 1
            step_ms = profile.get("step_s", 0.0) / steps * 1e3
            floor_ms = (weight_bytes + kv) / bandwidth * 1e3
            tokens = out.sequences[:, args.prompt :].cpu()
            row = {"policy": policy, "route": route, "batch": args.batch, "prompt": args.prompt,
                   "step_ms": round(step_ms, 3), "maintain_ms": round(profile.get("maintain_s", 0.0) / steps * 1e3, 3),
                   "prefill_s": round(out.prefill_seconds, 3), "kv_bytes": kv, "weight_bytes": weight_bytes,
                   "floor_ms": round(floor_ms, 3), "x_floor": round(step_ms / floor_ms, 2)}
            if first_tokens is None:
                first_tokens = tokens
            else:  # bf16: rounding differs between kernels, so near-ties may flip
                same = (tokens == first_tokens).all(0)
                row["tokens_equal_to_" + args.routes[0]] = bool(same.all())
                row["first_divergent_step"] = None if bool(same.all()) else int((~same).nonzero()[0])
            rows.append(row)
            print(row, flush=True)
            del out
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=32, help="tokens generated per row (decode steps + 1)")
    ap.add_argument("--prefill-rows", type=int, default=4, help="rows per prefill chunk")
    ap.add_argument("--policies", type=lambda s: s.split(","), default=["pyramidinfer_54_floor", "full"])
    ap.add_argument("--routes", type=lambda s: s.split(","), default=["auto", "fold", "expanded"],
                    help="in-model routes: auto (kvpolicy's default), fold, enable_gqa, expanded (before the change)")
    ap.add_argument("--attn-batch", type=int, default=112)
    ap.add_argument("--attn-heads", type=int, default=32)
    ap.add_argument("--attn-kv-heads", type=int, default=8)
    ap.add_argument("--attn-slots", type=int, default=3700)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--skip-model", action="store_true", help="only the attention call alone")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape != "tiny" and device != "cuda":
        ap.error(f"--shape {args.shape} needs a GPU; use --shape tiny for a CPU dry run")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device, 4.0 if device == "cuda" else 0.05)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + written)")
    alone = attention_alone(args, device, dtype, bandwidth)
    for row in alone:
        print(row)
    model_rows = [] if args.skip_model else in_model(args, device, dtype, bandwidth)
    if args.json:
        meta = run_meta(argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])], shape=args.shape,
                        dtype=str(dtype), copy_bandwidth_bytes_s=bandwidth)
        args.json.write_text(json.dumps({"meta": meta, "attention_alone": alone, "in_model": model_rows}, indent=1))


if __name__ == "__main__":
    main()
