"""Tokens/s against batch size, one line per policy, from ``benchmarks/throughput.py`` result files.

    python benchmarks/plot_batches.py docs/benchmarks/raw/onepath_*.json --out docs/benchmarks/onepath_batches.png

Later files win where two hold the same policy and batch (list a re-run after the run it
replaces); out-of-memory rows are drawn as an x at the batch that did not fit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_rows(paths: list[Path]) -> dict[str, dict[int, dict]]:
    by_policy: dict[str, dict[int, dict]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        for row in data.get("rows", data if isinstance(data, list) else []):
            by_policy.setdefault(row["policy"], {})[row["batch"]] = row
    return by_policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="generated tokens/s against batch")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(args.files)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, batches in sorted(rows.items()):
        fits = sorted((b, r["generated_tokens_per_s"]) for b, r in batches.items() if not r.get("oom"))
        if fits:
            line, = ax.plot(*zip(*fits), marker="o", label=policy)
            for b, r in batches.items():
                if r.get("oom"):
                    ax.plot([b], [0], marker="x", color=line.get_color(), markersize=9)
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
