"""Diagnostics of the static decode path on the GPU: memory held across calls, recompiles, step vs
re-compression time. Not a benchmark (see throughput.py); a quick look before a long run.

    python benchmarks/static_decode_check.py --batches 16,16,24 --new-tokens 64
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from throughput import build_model
from torch._dynamo.utils import counters

from kvpolicy.generation import generate_static


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="pyramidinfer_54")
    ap.add_argument("--batches", default="16,16,24")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--shape", default="llama2-7b")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    gib = 2**30
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt), device=device)
        profile: dict = {}
        start = time.perf_counter()
        res = generate_static(model, ids, policy=args.policy, max_new_tokens=args.new_tokens, profile=profile)
        seconds = time.perf_counter() - start
        kv = res.cache.memory_bytes()
        del res
        gc.collect()
        row = {
            "batch": batch,
            "seconds": round(seconds, 2),
            "kv_gib": round(kv / gib, 2),
            "allocated_after_gib": round(torch.cuda.memory_allocated() / gib, 2) if device == "cuda" else None,
            "reserved_after_gib": round(torch.cuda.memory_reserved() / gib, 2) if device == "cuda" else None,
            "unique_graphs": counters["stats"]["unique_graphs"],
            "step_ms": round(1000 * profile["step_s"] / profile["steps"], 2),
            "maintain_ms": round(1000 * profile["maintain_s"] / profile["steps"], 2),
            **{k.replace("_bytes", "_gib"): round(v / gib, 2)
               for k, v in profile.items() if k.startswith(("peak_", "held_"))},
            "cudagraph_counters": {k: v for k, v in counters["inductor"].items() if "cudagraph" in k},
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
