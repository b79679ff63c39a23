"""The head-ragged layer kind on a GPU: the same tokens as the rectangle, the bytes freed, no extra host reads.

On CUDA the default decode is compiled (frozen layers, which rebuild the rectangle), so each policy runs
three ways on compiled_path_check's small random model and batch (bf16): the rectangle (DynamicLayer)
eagerly, the ragged kind eagerly, and the ragged kind through plain (compiled) ``generate``. It records
whether the tokens agree, the stored bytes after the prompt and at the end as the share of full's freed
(full's rectangle holds the batch's left padding too), and the wall time of the whole ``generate`` call
(prompt included; the eager ragged kind rebuilds each layer's rectangle for attention at every step).

    python benchmarks/ragged_gpu_check.py --json docs/benchmarks/ragged_gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compiled_path_check as cpc  # noqa: E402 - the benchmarks' shared model and batch

import kvpolicy  # noqa: E402
from kvpolicy.core.layers import DynamicLayer, RaggedLayer  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402

CASES = {"full": {}, "kvzip@0.5": {"compression_ratio": 0.5}, "snapkv_adakv@0.5": {"compression_ratio": 0.5},
         "snapkv@0.5": {"compression_ratio": 0.5}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(model, inputs, name: str, settings: dict, kind: type, compiled: bool, steps: int) -> dict:
    policy = name.partition("@")[0]
    prompt_cache = kvpolicy.make_cache(policy, layer_kind=kind, compiled_decode=compiled, **settings)
    cpc.greedy_generate(model, inputs, prompt_cache, 1)  # the prompt and one token: what the prompt left
    after_prompt = prompt_cache.memory_bytes(allocated=False)
    del prompt_cache
    cache = kvpolicy.make_cache(policy, layer_kind=kind, compiled_decode=compiled, **settings)
    sync()
    start = time.perf_counter()
    out = cpc.greedy_generate(model, inputs, cache, steps)
    sync()
    seconds = time.perf_counter() - start
    return {"tokens": out.sequences[:, inputs["input_ids"].shape[1]:].cpu().tolist(), "bytes_prompt": after_prompt,
            "bytes_end": cache.memory_bytes(allocated=False), "seconds": seconds,
            "packed": sum(bool(getattr(layer, "packed", False)) for layer in cache.layers)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="float32: tokens comparable bit for bit (a random bf16 model's near-ties flip between runs)")
    ap.add_argument("--shape", default="small", choices=list(cpc.SHAPES))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the script
    model = cpc.build_model(args.shape, device, getattr(torch, args.dtype))
    inputs = cpc.make_batch(8, 300, 600, model.config.vocab_size, 0, device)
    ways = {"rectangle eager": (DynamicLayer, False), "ragged eager": (RaggedLayer, False),
            "ragged generate": (RaggedLayer, None)}
    results = {}
    for name, settings in CASES.items():
        for way, (kind, compiled) in ways.items():
            try:
                run(model, inputs, name, settings, kind, compiled, 4)  # warm (compilation, allocator)
                results[name, way] = run(model, inputs, name, settings, kind, compiled, args.steps)
            except Exception as err:  # noqa: BLE001 - recorded in the row, the other ways still run
                results[name, way] = {"error": f"{type(err).__name__}: {err}"}
    rows = []
    for name in CASES:
        full = {way: results["full", way] for way in ways}
        row = {"policy": name}
        for way in ways:
            r = results[name, way]
            if "error" in r or "error" in full[way]:
                row[way] = {"error": r.get("error", full[way].get("error"))}
                continue
            row[way] = {"freed_prompt": round(1 - r["bytes_prompt"] / full[way]["bytes_prompt"], 4),
                        "freed_end": round(1 - r["bytes_end"] / full[way]["bytes_end"], 4),
                        "generate_s": round(r["seconds"], 4), "packed_layers": r["packed"]}
        base = results[name, "rectangle eager"]["tokens"]
        row["same_tokens"] = {way: results[name, way].get("tokens") == base for way in ways}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        meta = run_meta(tool="ragged_gpu_check", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                        steps=args.steps, dtype=args.dtype, shape=args.shape)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
