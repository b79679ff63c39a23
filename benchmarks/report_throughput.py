"""Turn the throughput JSON files written by benchmarks/throughput.py into a table and a plot.

    python benchmarks/report_throughput.py docs/benchmarks/raw/run_d1.json docs/benchmarks/raw/run_d2.json \
        docs/benchmarks/raw/run_d3.json --out docs/benchmarks/throughput
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(paths: list[Path]) -> list[tuple[dict, list[dict]]]:
    """One (meta, rows) pair per run file: each table names the run that produced it. Rows of a
    fixed batch that ran out of memory are kept (``oom``); the table shows them, the plot does not."""
    runs = []
    for p in paths:
        data = json.loads(p.read_text())
        runs.append((data["meta"], data["rows"]))
    return runs


def table(rows: list[dict]) -> str:
    """One line per row; ``profile`` columns (compiled step / eager re-compression, synchronised)
    only where the static path was profiled."""
    profiled = any("profile_step_ms" in r for r in rows)
    extra = " | profiled: step ms + re-compression ms" if profiled else ""
    head = (f"| policy | batch | KV MiB/seq | peak GiB | prefill s | decode step ms | generated tok/s{extra} |\n"
            f"|---|---|---|---|---|---|---{'|---' if profiled else ''}|\n")
    lines = []
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['policy']} | {r['batch']} | out of memory | | | | |{' |' if profiled else ''}")
            continue
        kv = "-" if r["kv_bytes_per_seq"] is None else f"{r['kv_bytes_per_seq'] / 2**20:.0f}"
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        search = r.get("search", "")
        batch = f"**{r['batch']}** (max)" if search.startswith("largest") else (
            f"{r['batch']} (fits, search)" if search else str(r["batch"]))
        prof = ""
        if profiled:
            prof = (f" | {r['profile_step_ms']:.1f} + {r['profile_maintain_ms']:.1f}"
                    if "profile_step_ms" in r else " | ")
        lines.append(
            f"| {r['policy']} | {batch} | {kv} | {peak} | {r['prefill_s']:.2f} | {r['decode_step_ms']:.1f} | "
            f"{r['generated_tokens_per_s']:.0f}{prof} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    """One panel per prompt length; colour = policy, marker = run (lines join one run's points:
    ratios are only read within a run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("oom")]
    prompts = sorted({r["prompt"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    colours = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    markers = {run: "osD^vP*X"[i % 8] for i, run in enumerate(runs)}
    fig, axes = plt.subplots(1, len(prompts), figsize=(7 * len(prompts), 5), squeeze=False)
    for ax, prompt in zip(axes[0], prompts):
        for run in runs:
            for policy in policies:
                pts = sorted({(r["batch"], r["generated_tokens_per_s"]) for r in rows
                              if r["policy"] == policy and r["run"] == run and r["prompt"] == prompt})
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[run], color=colours[policy],
                            label=f"{policy} ({Path(run).stem})")
        ax.set_xlabel("batch size (each run's last point: largest batch it found to fit)")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(f"Llama-2-7B shape, bf16, H100: prompt {prompt} + 256 generated")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def run_header(name: str, meta: dict) -> str:
    """Reads the keys every throughput file has; the commit and date only where the file has the
    full meta block (files written before kvpolicy.provenance existed do not)."""
    where = ""
    if meta.get("commit"):
        where = f", commit `{meta['commit'][:12]}`" + (" with uncommitted changes" if meta.get("dirty") else "")
    if meta.get("date"):
        where += f", {meta['date']}"
    return (
        f"Run `{name}` on {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['shape']} {meta['dtype']}{where}:\n\n```bash\n{meta['command']}\n```\n\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="path stem: writes .json, .png and _table.md")
    args = ap.parse_args()
    runs = load(args.inputs)
    rows = [dict(r, run=p.name) for p, (_, run_rows) in zip(args.inputs, runs) for r in run_rows]
    metas = [dict(meta, run=p.name) for p, (meta, _) in zip(args.inputs, runs)]
    args.out.with_suffix(".json").write_text(json.dumps({"runs": metas, "rows": rows}, indent=1))
    text = "".join(run_header(p.name, meta) + table(run_rows) + "\n" for p, (meta, run_rows) in zip(args.inputs, runs))
    Path(str(args.out) + "_table.md").write_text(text)
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
