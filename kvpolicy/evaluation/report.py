"""Presenting ``compare`` results: a rich table, the JSON file, and the plot.

Why separate from the runner: the rows are plain dicts (the JSON schema of docs/cli.md), so
anything that prints, saves or plots them needs no model and can be tested on its own.

A results file is ``{"meta": ..., "rows": [...]}``: the rows, and where they came from
(:func:`kvpolicy.provenance.run_meta`). Files written before the ``meta`` block existed are a
bare list of rows; :func:`load_results` reads both.

    python -m kvpolicy.evaluation.report docs/benchmarks/quality_sweep.json \
        docs/benchmarks/quality_sweep_pyramidkv.json --plot docs/benchmarks/quality_sweep.png --markdown

redraws a plot (and prints the Markdown table) from recorded files, the later files' rows
replacing the earlier ones of the same label (:func:`merge_runs`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
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


#: keys of the ``meta`` block every results file written by ``compare``/``sweep`` carries
REQUIRED_META_KEYS = ("command", "argv", "commit", "dirty", "versions", "machine", "date")


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
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind)
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


def validate_meta(meta: Any) -> None:
    """Raise ``ValueError`` naming the first ``meta`` key missing (see :data:`REQUIRED_META_KEYS`)."""
    if not isinstance(meta, dict):
        raise ValueError("results must carry a 'meta' object (kvpolicy.provenance.run_meta)")
    for key in REQUIRED_META_KEYS:
        if key not in meta:
            raise ValueError(f"meta lacks {key!r}")


def validate_results(data: Any, task_names: list[str]) -> None:
    """A whole results file (``{"meta": ..., "rows": [...]}``) against docs/cli.md."""
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError("results must be an object with 'meta' and 'rows'")
    validate_meta(data.get("meta"))
    validate_rows(data["rows"], task_names)


def save_json(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    """Write ``{"meta": meta, "rows": rows}`` (``meta``: :func:`kvpolicy.provenance.run_meta`)."""
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def load_results(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """``(meta, rows)`` of a results file; ``meta`` is None for an old file (a bare list of rows)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return None, data
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        return data.get("meta"), data["rows"]
    raise ValueError(f"{path}: neither a results object with 'rows' nor a list of rows")


def merge_runs(runs: list[list[dict[str, Any]]], reference: str = "full") -> list[dict[str, Any]]:
    """The first run's rows, each replaced by a later run's row of the same label (or that row
    appended). The ``reference`` row always stays the first run's: every run measured its
    own, and the later ones are only compared with it (a ``ValueError`` if their perplexities
    differ, since then the later rows' ratios are against another reference)."""
    merged = [dict(r) for r in runs[0]]
    base_ref = next((r for r in merged if r["policy"] == reference), None)
    for rows in runs[1:]:
        for row in rows:
            if row["policy"] == reference:
                if base_ref is not None and "ppl" in row and "ppl" in base_ref and not math.isclose(
                    row["ppl"], base_ref["ppl"], rel_tol=1e-6
                ):
                    raise ValueError(
                        f"the runs' {reference} rows differ (ppl {base_ref['ppl']} vs {row['ppl']}): not one reference"
                    )
                continue
            at = next((i for i, r in enumerate(merged) if r["label"] == row["label"]), None)
            if at is None:
                merged.append(dict(row))
            else:
                merged[at] = dict(row)
    return merged


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _metric_columns(rows: list[dict[str, Any]], task_names: list[str]) -> list[str]:
    return [k for name in task_names for k in TASKS[name].columns(rows)]


def series(row: dict[str, Any]) -> str:
    """The line a row belongs to in a plot: its label without the ratio (``h2o@0.5`` -> ``h2o``), so a
    preset and its policy (``pyramidinfer_54_floor``, ``pyramidinfer``) are two lines."""
    return row["label"].split("@")[0]


def asked(row: dict[str, Any]) -> str:
    """The share of the prompt's KV the row asked to remove (its ``compression_ratio``, or its ``budget`` in
    tokens per layer; ``-`` for a policy run on its own schedule), beside which the table puts what it
    removed (``kv_reduction_prefill``): a policy that falls short of its target shows at a glance."""
    if row.get("ratio") is not None:
        return f"{row['ratio']:.1%}"
    budget = (row.get("settings") or {}).get("budget")
    return "-" if budget is None else f"{budget} tok"


def print_table(rows: list[dict[str, Any]], task_names: list[str], console: Any = None) -> None:
    """The rows as a table: ``asked`` (:func:`asked`) and ``removed`` (the share of the prompts' KV removed
    after prefill, the quantity ``compression_ratio`` sets), then the KV held at the end and the costs."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="kvpolicy compare", show_lines=False)
    columns = ["policy", "asked", "removed", "KV MiB", "KV reduction", "peak MiB", "prefill s", "decode tok/s"]
    metric_keys = _metric_columns(rows, task_names)
    titles = {k: TASKS[name].title(k) for name in task_names for k in TASKS[name].columns(rows)}
    for col in columns + [titles[k] for k in metric_keys]:
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=col == "policy")
    for r in rows:
        cells = [
            r["label"],
            asked(r),
            f"{r['kv_reduction_prefill']:.1%}",
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
    lines = list(dict.fromkeys(series(r) for r in rows))
    for r in rows:
        if r["ratio"] is None or r["ratio"] == shown:
            ax.plot(r["layer_tokens_prefill"], label=r["label"], **_style(lines.index(series(r)), r["label"], "."))
    ax.set_xlabel("layer")
    ax.set_ylabel("KV tokens kept after prefill")
    ax.set_title("tokens kept per layer" + (f" (ratio {shown:g})" if shown is not None else ""))
    ax.legend(fontsize=7)
    reference = next((r for r in rows if r["policy"] == "full" and r["ratio"] is None), None)
    for ax, (key, higher) in zip(axes[1:], headlines):
        if reference is not None and key in reference and not math.isnan(reference[key]):
            ax.axhline(reference[key], color="grey", linestyle="--", linewidth=0.8, label="full (reference)")
        for p in lines:
            pts = sorted((r["kv_reduction"], r[key]) for r in rows if series(r) == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=p, **_style(lines.index(p), p, "o"))
        ax.set_xlabel("KV reduction vs full")
        ax.set_ylabel(key + (" (higher is better)" if higher else " (lower is better)"))
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _style(index: int, label: str, marker: str) -> dict[str, Any]:
    """A colour of its own for each of up to 20 series (the default cycle repeats after 10, and a
    kvpress comparison has more), and kvpress's rows (``kvpress:...``) dashed with square markers."""
    import matplotlib

    other = label.startswith("kvpress:")
    return {"color": matplotlib.colormaps["tab20"](index % 20), "linestyle": "--" if other else "-",
            "marker": "s" if other else marker, "markersize": 4 if other else None}


def markdown_table(rows: list[dict[str, Any]], task_names: list[str]) -> str:
    """The rows as a Markdown table (used for docs/benchmarks/quality.md)."""
    keys = _metric_columns(rows, task_names)
    head = ["policy", "ratio", "KV MiB (end)", "KV reduction", "KV red. (prefill)", "peak MiB", "prefill s",
            "decode tok/s"] + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            series(r),
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


def main(argv: list[str] | None = None) -> int:
    """Redraw the plot / print the Markdown table of recorded results files (later files' rows
    replace the earlier ones of the same label)."""
    ap = argparse.ArgumentParser(prog="python -m kvpolicy.evaluation.report", description=main.__doc__)
    ap.add_argument("files", nargs="+", type=Path, help="results files of compare/sweep --json, base run first")
    ap.add_argument("--tasks", default=None, help="tasks to show (default: those every row has)")
    ap.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    ap.add_argument("--markdown", action="store_true", help="print the rows as a Markdown table")
    args = ap.parse_args(argv)
    rows = merge_runs([load_results(p)[1] for p in args.files])
    if args.tasks:
        task_names = [t for t in args.tasks.split(",") if t]
    else:
        task_names = [n for n, t in TASKS.items() if all(k in r for r in rows for k in t.metric_keys)]
    validate_rows(rows, task_names)
    if args.plot:
        plot(rows, task_names, args.plot)
    if args.markdown:
        print(markdown_table(rows, task_names))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
