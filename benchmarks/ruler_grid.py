"""The whole RULER-style grid in one call: policies x ratios x tasks x lengths x samples, split over GPUs.

Why a launcher: on one GPU the grid (8 policies x 4 ratios + full, 7 tasks, 2k/4k/8k tokens, 20
samples: 14k generations of 2k-8k-token prompts) is estimated above the 10-minute limit of one
call; split by policy into shards (one ``kvpolicy compare --suite ruler`` process each, with its
own ``full`` reference for its KV ratios) run by the GPUs of one host, it is a few minutes, and
each shard's JSON is written as soon as it ends, so a call cut short keeps the finished shards.
Samples depend only on the seed, task, length and index, so every shard runs the same samples;
the shards' JSON files are merged into one, with a plot and the Markdown tables of
docs/benchmarks/ruler.md.

    python benchmarks/ruler_grid.py --out /tmp/ruler --gpus 4 -- --context 2048,4096,8192 --samples 20 \\
        --batch-size 140 --prefill-rows 16 --dtype bfloat16

Everything after ``--`` goes to each ``kvpolicy compare`` (``--device cuda`` is added unless
``--device`` is given). ``--gpus 0`` runs the shards one after another on the CPU (a dry run with a
tiny model: tests/test_ruler.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: every kvpolicy policy; pyramidinfer as its ratio form (configs/pyramidinfer_ratio.yaml) and kvzip with its
#: SmolLM2 prompt ids, scaled to each ratio
GRID_POLICIES = ("pyramidinfer,h2o,snapkv,pyramidkv,tova,knorm,streamingllm,random,expected_attention,"
                 "kvzip_smollm2")


def shards(policies: list[str], count: int) -> list[list[str]]:
    """``policies`` dealt round-robin into ``count`` shards (empty ones dropped); ``full`` runs in each."""
    out = [policies[i::count] for i in range(max(1, count))]
    return [s for s in out if s]


def shard_command(policies: list[str], json_path: Path, passthrough: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "kvpolicy", "compare", "--suite", "ruler", "--policies", ",".join(policies),
           "--json", str(json_path), "--quiet", *passthrough]
    if "--device" not in passthrough:
        cmd += ["--device", "cuda"]
    return cmd


def merge(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The shards' rows as one list (``full`` once, from the first shard) and their ``meta`` blocks. Each
    shard's own ``full`` row keeps its KV ratios right; the shards' ``full`` scores must agree."""
    from kvpolicy.evaluation.report import load_results

    rows: list[dict[str, Any]] = []
    metas = []
    for path in paths:
        meta, shard_rows = load_results(path)
        metas.append(meta)
        for row in shard_rows:
            if row["label"] == "full" and rows:
                first = rows[0]
                if abs(row["ruler_score"] - first["ruler_score"]) > 1e-9:
                    print(f"note: {path.name}'s full scored {row['ruler_score']:.4f}, the first shard's "
                          f"{first['ruler_score']:.4f} (nondeterministic kernels?)", file=sys.stderr)
                continue
            rows.append(row)
    return rows, metas


def queues(jobs: list, gpus: int, per_gpu: int) -> list[tuple[int, list]]:
    """``(gpu, its jobs)`` for each of the ``gpus * per_gpu`` workers, the jobs dealt round-robin: the
    workers of one GPU share it, each running its jobs one after another."""
    workers = gpus * per_gpu
    return [(w % gpus, jobs[w::workers]) for w in range(workers) if jobs[w::workers]]


def _run_queue(jobs: list[tuple[int, list[str]]], gpu: int | None, out: Path, passthrough: list[str]) -> list[int]:
    """Run ``jobs`` one after another on ``gpu`` (None: the CPU); the indices of those that failed."""
    failed = []
    for i, policies in jobs:
        cmd = shard_command(policies, out / f"shard{i}.json",
                            passthrough if gpu is not None else [*passthrough, "--device", "cpu"])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        print(f"shard {i} on {'cpu' if gpu is None else f'gpu {gpu}'}: {' '.join(cmd[1:])}", file=sys.stderr,
              flush=True)
        started = time.time()
        with open(out / f"shard{i}.log", "w") as log:
            code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        print(f"shard {i} done in {time.time() - started:.0f} s (exit {code})", file=sys.stderr, flush=True)
        if code != 0:
            failed.append(i)
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the shards' JSON, ruler.json, .png, .md")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs 0..N-1 to use (default: all; 0: the CPU, serially)")
    ap.add_argument("--policies", default=GRID_POLICIES, help=f"policies to split (default: {GRID_POLICIES})")
    ap.add_argument("--jobs", type=int, default=None,
                    help="shards (processes, each with its own full row; default: one per policy): each GPU runs "
                         "its share one after another, and every finished shard's JSON stays if a later one fails "
                         "or the call is cut short")
    ap.add_argument("--per-gpu", type=int, default=1,
                    help="shards run at once on each GPU (default 1): a 135M model leaves an H200 mostly idle, "
                         "its decode bound by the host, so several processes share one GPU well")
    args = ap.parse_args(own)
    if args.per_gpu < 1:
        ap.error("--per-gpu must be at least 1")
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
    args.out.mkdir(parents=True, exist_ok=True)
    policies = [p for p in args.policies.split(",") if p and p != "full"]
    parts = shards(policies, args.jobs or len(policies))
    jobs = list(enumerate(parts))
    started = time.time()
    if args.gpus:
        from concurrent.futures import ThreadPoolExecutor

        plan = queues(jobs, args.gpus, args.per_gpu)
        with ThreadPoolExecutor(len(plan)) as pool:
            results = pool.map(lambda q: _run_queue(q[1], q[0], args.out, passthrough), plan)
            failed = [i for r in results for i in r]
    else:
        failed = _run_queue(jobs, None, args.out, passthrough)
    for i in failed:
        print(f"shard {i} failed; its log:\n" + (args.out / f"shard{i}.log").read_text()[-3000:], file=sys.stderr)
    paths = [args.out / f"shard{i}.json" for i, _ in jobs if i not in failed]
    if not paths:
        return 1
    rows, metas = merge(paths)
    from kvpolicy.evaluation import report
    from kvpolicy.evaluation.ruler.report import markdown
    from kvpolicy.provenance import run_meta

    meta = run_meta([Path(__file__).name, *argv], tool="benchmarks/ruler_grid.py", gpus=args.gpus, per_gpu=args.per_gpu,
                    shards=[{"policies": p, "meta": m} for (i, p), m in zip([j for j in jobs if j[0] not in failed],
                                                                          metas)],
                    failed_shards=[parts[i] for i in failed], wall_s=round(time.time() - started, 1))
    report.save_json(rows, args.out / "ruler.json", meta)
    report.plot(rows, ["ruler"], args.out / "ruler.png")
    (args.out / "ruler.md").write_text(markdown(rows))
    print(json.dumps({"wall_s": meta["wall_s"], "rows": len(rows), "failed_shards": len(failed)}))
    print(markdown(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
