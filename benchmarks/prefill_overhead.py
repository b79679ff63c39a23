"""What a compressing cache adds to one prefill forward: kvpolicy's caches vs transformers' DynamicCache.

The static decode path prefills the prompt batch in row chunks through ordinary
``PolicyCache`` objects; on the H100 its prefill cost 17.3 ms per row where transformers' own
cost 15.2 (docs/benchmarks/throughput.md). This times one chunk's forward (synchronised, median
of ``--reps``) with each cache, counts the device synchronisations in one forward
(``torch.cuda.set_sync_debug_mode``), and times ``generate_static``'s whole prefill (chunks plus
freeze) at ``--chunks`` chunks. Which kvpolicy is measured is whatever ``import kvpolicy``
finds first on ``PYTHONPATH`` (the output names its path), so two checkouts can be compared on
one machine::

    PYTHONPATH=/path/to/old python benchmarks/prefill_overhead.py --label old --json old.json
    python benchmarks/prefill_overhead.py --label new --json new.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

sys.path.append(str(Path(__file__).resolve().parent))
from throughput import build_model, run_meta, sync  # noqa: E402

import kvpolicy  # noqa: E402
from kvpolicy.compiled_parts import compiled_parts  # noqa: E402
from kvpolicy.generation import generate_static  # noqa: E402


def count_syncs(fn) -> int:
    """Device synchronisations while ``fn`` runs (CUDA's sync debug mode warns at each)."""
    if not torch.cuda.is_available():
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measured_rates(size: int = 8192, reps: int = 10) -> dict[str, float]:
    """The ceilings a floor is taken against, measured on this card: a bf16 ``size``-cubed matrix
    product on random data and a 4 GiB device copy (bytes read plus written), each the mean of
    ``reps`` after three warm-ups."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(2 ** 31, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)

    def mean_s(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / reps

    matmul = mean_s(functools.partial(torch.matmul, a, b))
    copy = mean_s(functools.partial(dst.copy_, src))
    rates = {"matmul_flop_per_s": 2 * size ** 3 / matmul, "copy_bytes_per_s": 2 * src.numel() * 2 / copy}
    torch.cuda.empty_cache()
    return rates


def prefill_flops(config, tokens: int) -> float:
    """One row's prefill FLOPs: 2 per weight per token for every linear layer of the decoder (the
    lm_head runs on the last position only: ``logits_to_keep=1``), plus causal attention's two
    products, 2 x T^2/2 x head_dim x query heads each, per layer."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    linear = 2 * per_layer * layers * tokens
    attention = 2 * 2 * (tokens * tokens / 2) * head_dim * config.num_attention_heads * layers
    return float(linear + attention)


#: kernel name fragments -> kind, first match wins (cuBLAS/CUTLASS GEMMs, the SDPA kernels)
_KINDS = (("attention", ("flash", "fmha", "attention", "cudnn")),
          ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "wgmma")))


def kernel_times(forward) -> dict[str, float]:
    """Device milliseconds of one ``forward`` by kernel kind, and its ten costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    per_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.device_time_total / 1000 if hasattr(event, "device_time_total") else event.cuda_time_total / 1000
        name = event.name.lower()
        kind = next((k for k, parts in _KINDS if any(p in name for p in parts)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        per_kernel[event.name[:80]] = per_kernel.get(event.name[:80], 0.0) + ms
    top = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:10])
    return {**kinds, "total": sum(kinds.values()), "top": top}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=32, help="rows per prefill chunk")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=3, help="generate_static prefill of this many chunks (0: skip)")
    ap.add_argument("--policies", default="dynamic,full,pyramidinfer_54_floor",
                    help="'dynamic' (transformers' DynamicCache) and kvpolicy policy/preset names")
    ap.add_argument("--label", default="")
    ap.add_argument("--floor", action="store_true",
                    help="measure the card's bf16 matrix rate and copy bandwidth, and set each forward against "
                         "its compute floor (FLOPs over the measured rate)")
    ap.add_argument("--compile", choices=("none", "parts", "model"), default="none",
                    help="parts: kvpolicy.compiled_parts (each decoder layer's MLP and norms and the family's RoPE "
                         "compiled: the code that never sees the cache), as prefill(compile=True) runs it; "
                         "model: the whole forward (transformers' DynamicCache only: a reference point)")
    ap.add_argument("--kernels", action="store_true",
                    help="profile one forward per cache: device time by kernel kind (matmul, attention, other)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    arg = kvpolicy.cache_argument(model)
    if args.compile == "model":
        model.forward = torch.compile(model.forward, dynamic=False)
    ids = torch.randint(3, model.config.vocab_size, (args.rows, args.prompt), device=args.device)
    mask = torch.ones_like(ids)
    rows = []
    floor = {}
    if args.floor and args.device.startswith("cuda"):
        floor = measured_rates()
        floor["flop_per_row"] = prefill_flops(model.config, args.prompt)
        floor["floor_ms_per_row"] = 1000 * floor["flop_per_row"] / floor["matmul_flop_per_s"]
        print(json.dumps(floor), flush=True)
    for name in args.policies.split(","):
        def forward(name: str = name) -> None:  # bound now, though it is only called in this iteration
            cache = DynamicCache() if name == "dynamic" else kvpolicy.make_cache(name)
            parts = compiled_parts(model) if args.compile == "parts" else contextlib.nullcontext()
            with torch.no_grad(), parts:
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **{arg: cache})

        forward()  # warm-up
        times = []
        for _ in range(args.reps):
            gc.collect()  # older kvpolicy versions' caches were freed by the cycle collector only
            sync(args.device)
            start = time.perf_counter()
            forward()
            sync(args.device)
            times.append(time.perf_counter() - start)
        gc.collect()
        row = {"cache": name, "rows": args.rows, "prompt": args.prompt, "forward_ms": 1000 * statistics.median(times),
               "forward_ms_all": [1000 * t for t in times], "syncs_per_forward": count_syncs(forward)}
        row["ms_per_row"] = row["forward_ms"] / args.rows
        if floor:
            row["x_floor"] = row["ms_per_row"] / floor["floor_ms_per_row"]
        if args.kernels and args.device.startswith("cuda"):
            row["kernel_ms"] = kernel_times(forward)
        if args.chunks and name != "dynamic":
            batch = ids.repeat(args.chunks, 1)
            compile_prefill = args.compile == "parts"
            generate_static(model, batch, policy=name, max_new_tokens=1, prefill_batch_size=args.rows,
                            compile_prefill=compile_prefill)  # warm-up
            res = generate_static(model, batch, policy=name, max_new_tokens=1, prefill_batch_size=args.rows,
                                  compile_prefill=compile_prefill)
            row["static_prefill_ms_per_row"] = 1000 * res.prefill_seconds / batch.shape[0]
            del res
            gc.collect()
        rows.append(row)
        print(json.dumps(row), flush=True)
    # run_meta's block (argv, commit and dirty flag, versions, machine and threads, date) plus the
    # keys this script always wrote
    full_argv = sys.argv if argv is None else ["benchmarks/prefill_overhead.py", *argv]
    meta = run_meta(full_argv, label=args.label, floor=floor or None,
                    device=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                    torch=torch.__version__, transformers=transformers.__version__, shape=args.shape, dtype=args.dtype)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
