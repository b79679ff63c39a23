"""Tables and a plot from benchmarks/decode_kernel_check.py's JSON files: the kernel's time against the bytes floor.

    python benchmarks/report_decode_kernel.py docs/benchmarks/decode_kernel/run1_byte_loads.json \\
        docs/benchmarks/decode_kernel/run2_word_loads.json --plot docs/benchmarks/decode_kernel.png

Prints one markdown table per run (error per dtype, then time per shape and dtype); ``--plot`` draws each run's
kernel time as a multiple of the floor, beside the SDPA route's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def tables(name: str, data: dict) -> str:
    meta = data["meta"]
    lines = [f"Run `{name}`: {meta.get('device')}, torch {meta['versions']['torch']}, transformers "
             f"{meta['versions']['transformers']}, copy bandwidth {meta['copy_bandwidth_tb_s']:.3f} TB/s, "
             f"source digest `{meta['source_digest']}`, {meta['date']}.", "",
             "| kv_dtype | shape (B, H_q, H_kv, D, slots) | kernel max abs error | SDPA route max abs error "
             "| largest output |",
             "|---|---|---|---|---|"]
    for r in data["errors"]:
        lines.append(f"| {r['kv_dtype']} | {tuple(r['shape'])} | {r['kernel_max_abs_err']:.4f} | "
                     f"{r['sdpa_max_abs_err']:.4f} | {r['reference_max_abs']:.2f} |")
    lines += ["", "| shape | kv_dtype | MB read | floor us | kernel us | kernel x floor | SDPA route us "
              "| SDPA x floor |", "|---|---|---|---|---|---|---|---|"]
    for r in data["timings"]:
        lines.append(f"| {r['shape']} | {r['kv_dtype']} | {r['bytes_read'] / 1e6:.0f} | {r['floor_us']:.0f} | "
                     f"{r['kernel_us']:.0f} | **{r['kernel_x_floor']:.2f}** | {r['sdpa_us']:.0f} | "
                     f"{r['sdpa_x_floor']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False)
    for ax, (name, data) in zip(axes[0], runs.items()):
        rows = data["timings"]
        labels = [f"{r['shape'].split(',')[0]}\n{r['kv_dtype']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["kernel_x_floor"] for r in rows], 0.4, label="Triton kernel")
        ax.bar([i + 0.2 for i in x], [min(r["sdpa_x_floor"], 8) for r in rows], 0.4,
               label="dequantize + SDPA (cut at 8)")
        ax.axhline(1.3, color="k", ls="--", lw=1, label="target 1.3x")
        ax.set_xticks(list(x), labels, fontsize=6, rotation=90)
        ax.set_ylabel("time / bytes floor")
        ax.set_title(f"{name} ({data['meta'].get('device')})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    runs = {f.stem: json.loads(f.read_text()) for f in args.files}
    for name, data in runs.items():
        print(tables(name, data))
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
