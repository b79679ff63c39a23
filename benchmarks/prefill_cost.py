"""CPU time of one prompt forward per cache, on the embedded model: what a policy adds to the prefill.

Why CPU time: on a shared machine the wall time of ``kvpolicy compare``'s rows moves with the other
processes; ``time.process_time`` of this process moves far less. The prompt is the needle task's first
document (``--sizes needle``, the question left out, about 1.2k tokens); each cache runs ``--reps``
times and the fastest run counts. Policies that score with a second forward (KVzip) include it, since
it runs inside the model call.

    OMP_NUM_THREADS=1 python benchmarks/prefill_cost.py --policies full,expected_attention@0.5,kvzip@0.5 \\
        --json docs/benchmarks/prefill_cost.json

A name is a policy or a preset, ``@ratio`` sets its ``compression_ratio``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import kvpolicy
from kvpolicy.core.config import load_preset
from kvpolicy.evaluation import tasks
from kvpolicy.models import load_model
from kvpolicy.provenance import run_meta


def spec_of(name: str) -> dict:
    policy, _, ratio = name.partition("@")
    try:
        spec = dict(load_preset(policy))
    except kvpolicy.ConfigError:
        spec = {"policy": policy}
    if ratio:
        spec["compression_ratio"] = float(ratio)
    return spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="full,expected_attention@0.5,kvzip@0.5")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    task = tasks.NeedleTask()
    task.prepare(tok, dataclasses.replace(tasks.PRESETS["needle"], question="after_context"))
    ids = torch.tensor([task.samples[0]["context"]])
    cpu_s: dict[str, float] = {}
    for name in args.policies.split(","):
        spec = spec_of(name)
        best = float("inf")
        for _ in range(args.reps):
            cache = kvpolicy.make_cache(spec)
            with torch.no_grad():
                start = time.process_time()
                model(input_ids=ids, logits_to_keep=1, use_cache=True, **{kvpolicy.cache_argument(model): cache})
                best = min(best, time.process_time() - start)
        cpu_s[name] = round(best, 3)
        print(f"{name}: {best:.2f} s CPU ({best / cpu_s[args.policies.split(',')[0]]:.2f}x the first)", flush=True)
    if args.json:
        data = {"meta": run_meta(["python", "benchmarks/prefill_cost.py", *(sys.argv[1:] if argv is None else argv)],
                                 tool="prefill_cost", reps=args.reps, threads=args.threads),
                "prompt_tokens": int(ids.shape[1]), "cpu_s": cpu_s}
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
