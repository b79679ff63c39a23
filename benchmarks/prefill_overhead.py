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
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    arg = kvpolicy.cache_argument(model)
    ids = torch.randint(3, model.config.vocab_size, (args.rows, args.prompt), device=args.device)
    mask = torch.ones_like(ids)
    rows = []
    for name in args.policies.split(","):
        def forward(name: str = name) -> None:  # bound now, though it is only called in this iteration
            cache = DynamicCache() if name == "dynamic" else kvpolicy.make_cache(name)
            with torch.no_grad():
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
        if args.chunks and name != "dynamic":
            batch = ids.repeat(args.chunks, 1)
            generate_static(model, batch, policy=name, max_new_tokens=1, prefill_batch_size=args.rows)  # warm-up
            res = generate_static(model, batch, policy=name, max_new_tokens=1, prefill_batch_size=args.rows)
            row["static_prefill_ms_per_row"] = 1000 * res.prefill_seconds / batch.shape[0]
            del res
            gc.collect()
        rows.append(row)
        print(json.dumps(row), flush=True)
    # run_meta's block (argv, commit and dirty flag, versions, machine and threads, date) plus the
    # keys this script always wrote
    full_argv = sys.argv if argv is None else ["benchmarks/prefill_overhead.py", *argv]
    meta = run_meta(full_argv, label=args.label,
                    device=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                    torch=torch.__version__, transformers=transformers.__version__, shape=args.shape, dtype=args.dtype)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
