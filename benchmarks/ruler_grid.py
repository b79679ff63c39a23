"""The whole RULER-style grid in one call: policies x ratios x tasks x lengths x samples, split over GPUs.

Why a launcher: on one GPU the grid (9 policies x 4 ratios x 7 tasks x 2k/4k/8k x 20 samples, 13k
generations) is about the 10-minute limit of one call; split by policy over the GPUs of one host
(one ``kvpolicy compare --suite ruler`` process per GPU, each with its own ``full`` reference for
its KV ratios), it is a few minutes. Samples depend only on the seed, task, length and index, so
every shard runs the same samples; the shards' JSON files are merged into one, with a plot and the
Markdown tables of docs/benchmarks/ruler.md.

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

#: every kvpolicy policy; pyramidinfer as its floor preset, scaled to each ratio
GRID_POLICIES = "pyramidinfer_54_floor,h2o,snapkv,pyramidkv,tova,knorm,streamingllm,random"


def shards(policies: list[str], count: int) -> list[list[str]]:
    """``policies`` dealt round-robin into ``count`` shards (empty shards dropped); ``full`` runs in each."""
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the shards' JSON, ruler.json, .png, .md")
    ap.add_argument("--gpus", type=int, default=None, help="processes on GPUs 0..N-1 (default: all; 0: CPU, serial)")
    ap.add_argument("--policies", default=GRID_POLICIES, help=f"policies to split (default: {GRID_POLICIES})")
    args = ap.parse_args(own)
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = shards([p for p in args.policies.split(",") if p and p != "full"], max(1, args.gpus))
    started = time.time()
    procs, paths = [], []
    for i, part in enumerate(parts):
        path = args.out / f"shard{i}.json"
        paths.append(path)
        cmd = shard_command(part, path, passthrough if args.gpus else [*passthrough, "--device", "cpu"])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if args.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        log = open(args.out / f"shard{i}.log", "w")  # noqa: SIM115 - closed after the process ends
        print(f"shard {i}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append((proc, log))
        if not args.gpus:  # the CPU: one after another
            proc.wait()
    failed = []
    for i, (proc, log) in enumerate(procs):
        if proc.wait() != 0:
            failed.append(i)
        log.close()
    if failed:
        for i in failed:
            print(f"shard {i} failed; its log:\n" + (args.out / f"shard{i}.log").read_text()[-3000:], file=sys.stderr)
        return 1
    rows, metas = merge(paths)
    from kvpolicy.evaluation import report
    from kvpolicy.evaluation.ruler.report import markdown
    from kvpolicy.provenance import run_meta

    meta = run_meta([Path(__file__).name, *argv], tool="benchmarks/ruler_grid.py", gpus=args.gpus,
                    shards=[{"policies": p, "meta": m} for p, m in zip(parts, metas)],
                    wall_s=round(time.time() - started, 1))
    report.save_json(rows, args.out / "ruler.json", meta)
    report.plot(rows, ["ruler"], args.out / "ruler.png")
    (args.out / "ruler.md").write_text(markdown(rows))
    print(json.dumps({"wall_s": meta["wall_s"], "rows": len(rows)}))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
