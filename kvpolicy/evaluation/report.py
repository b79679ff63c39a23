"""Presenting ``compare`` results: a rich table, the JSON file, and the plot.

Why separate from the runner: the rows are plain dicts (the JSON schema of docs/cli.md), so
anything that prints, saves or plots them needs no model and can be tested on its own.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from .tasks import TASKS

#: keys every result row has, whatever the tasks (validated by tests/test_cli.py)
REQUIRED_KEYS = {
    "policy": str,
    "label": str,
    "kv_bytes": int,
    "kv_bytes_prefill": int,
    "kv_bytes_allocated": int,
    "kv_reduction": float,
    "kv_reduction_prefill": float,
    "peak_memory_bytes": int,
    "peak_memory_source": str,
    "prefill_s": float,
    "prefill_tokens_per_s": float,
    "decode_tokens_per_s": float,
    "layer_tokens_prefill": list,
    "layer_tokens_end": list,
}


def validate_rows(rows: Any, task_names: list[str]) -> None:
    """Raise ``ValueError`` naming the first row/key that breaks the documented schema."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("results must be a non-empty list of objects")
    expected = dict(REQUIRED_KEYS)
    for name in task_names:
        expected.update({key: float for key in TASKS[name].metric_keys})
    for i, row in enumerate(rows):
        for key, kind in expected.items():
            if key not in row:
                raise ValueError(f"row {i} lacks {key!r}")
            value = row[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
            if not ok:
                raise ValueError(f"row {i}: {key!r} should be {kind.__name__}, got {value!r}")
        if not 0.0 <= row["kv_reduction"] <= 1.0 and row["policy"] != "full":
            raise ValueError(f"row {i}: kv_reduction {row['kv_reduction']} outside [0, 1]")


def environment() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {
        "kvpolicy": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def save_json(rows: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def print_table(rows: list[dict[str, Any]], task_names: list[str], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="kvpolicy compare", show_lines=False)
    columns = ["policy", "KV MiB", "KV reduction", "peak MiB", "prefill s", "decode tok/s"]
    metric_keys = [k for name in task_names for k in TASKS[name].metric_keys]
    for col in columns + metric_keys:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        cells = [
            r["label"],
            _mib(r["kv_bytes"]),
            f"{r['kv_reduction']:.1%}",
            _mib(r["peak_memory_bytes"]),
            f"{r['prefill_s']:.2f}",
            f"{r['decode_tokens_per_s']:.1f}",
        ]
        cells += [f"{r[k]:.3f}" if k.startswith("ppl") else f"{r[k]:.1%}" for k in metric_keys]
        table.add_row(*cells)
    console.print(table)


def plot(rows: list[dict[str, Any]], task_names: list[str], path: str | Path) -> None:
    """Left: kept tokens per layer after prefill (the pyramid); right: quality vs KV reduction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headlines = [(TASKS[n].headline, TASKS[n].higher_is_better) for n in task_names]
    fig, axes = plt.subplots(1, 1 + len(headlines), figsize=(5 * (1 + len(headlines)), 4.2), squeeze=False)
    axes = axes[0]
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    shown = min(ratios, key=lambda x: abs(x - 0.54)) if ratios else None
    ax = axes[0]
    for r in rows:
        if r["ratio"] is None or r["ratio"] == shown:
            ax.plot(r["layer_tokens_prefill"], marker=".", label=r["label"])
    ax.set_xlabel("layer")
    ax.set_ylabel("KV tokens kept after prefill")
    ax.set_title("tokens kept per layer" + (f" (ratio {shown:g})" if shown is not None else ""))
    ax.legend(fontsize=7)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    for ax, (key, higher) in zip(axes[1:], headlines):
        for p in policies:
            pts = sorted((r["kv_reduction"], r[key]) for r in rows if r["policy"] == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ax.set_xlabel("KV reduction vs full")
        ax.set_ylabel(key + (" (higher is better)" if higher else " (lower is better)"))
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict[str, Any]], task_names: list[str]) -> str:
    """The rows as a Markdown table (used for docs/benchmarks/quality.md)."""
    keys = [k for name in task_names for k in TASKS[name].metric_keys]
    head = ["policy", "ratio", "KV MiB (end)", "KV reduction", "KV red. (prefill)", "peak MiB", "prefill s", "decode tok/s"] + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["policy"],
            "-" if r["ratio"] is None else f"{r['ratio']:g}",
            _mib(r["kv_bytes"]),
            f"{r['kv_reduction']:.1%}",
            f"{r['kv_reduction_prefill']:.1%}",
            _mib(r["peak_memory_bytes"]),
            f"{r['prefill_s']:.2f}",
            f"{r['decode_tokens_per_s']:.1f}",
        ] + [f"{r[k]:.3f}" if k.startswith("ppl") else f"{r[k]:.0%}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
