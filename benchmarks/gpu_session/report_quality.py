"""Tables, target checks and a plot of benchmarks/gpu_session/quality.sh's files (issues #25 and #27).

    python benchmarks/gpu_session/report_quality.py FOLDER --json docs/benchmarks/kv_dtype_quality.json \\
        --markdown docs/benchmarks/kv_dtype_quality_table.md --plot docs/benchmarks/kv_dtype_quality.png

FOLDER holds ``in-prompt/`` and ``after-context/``, each with the ``ruler_*.json`` and ``needle_prune.json``
files of ``kvpolicy compare``. Every process ran its own ``full`` row on the same samples (the suite's seed):
the first is kept as the reference, and the others are checked to agree with it. Bytes removed are the
cache's bytes after the prompt against ``full``'s at the model's dtype (``kv_reduction_prefill``), so an int8
row counts its codes and scales.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

QUESTIONS = ("in-prompt", "after-context")


def read(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for question in QUESTIONS:
        rows: dict[str, dict[str, Any]] = {}
        full_scores: list[float] = []
        meta = None
        for path in sorted((folder / question).glob("ruler_*.json")):
            data = json.loads(path.read_text())
            meta = meta or data["meta"]
            for row in data["rows"]:
                if row["label"] == "full":
                    full_scores.append(100 * row["ruler_score"])
                if row["label"] in rows:
                    continue
                rows[row["label"]] = {
                    "policy": row["policy"], "kv_dtype": row["kv_dtype"], "ratio": row["ratio"],
                    "ruler": 100 * row["ruler_score"], "of_full": row.get("ruler_score_ratio"),
                    "kv_removed": row.get("kv_reduction_prefill"), "file": path.name,
                    "tasks": {k.removeprefix("ruler_"): 100 * v for k, v in row.items() if k.startswith("ruler_niah")},
                }
        needle: dict[str, Any] = {}
        path = folder / question / "needle_prune.json"
        if path.exists():
            for row in json.loads(path.read_text())["rows"]:
                needle[row["label"]] = {"accuracy": row.get("needle_accuracy"),
                                        "kv_removed": row.get("kv_reduction_prefill")}
        out[question] = {"rows": rows, "full_scores_per_process": full_scores, "needle": needle,
                         "meta": {k: meta.get(k) for k in ("command", "commit", "dirty", "source_digest", "versions",
                                                            "machine", "date", "device", "model")} if meta else None}
    return out


def best_at(rows: dict[str, dict], least: float) -> tuple[str, dict] | None:
    fit = [(k, r) for k, r in rows.items() if k != "full" and (r["kv_removed"] or 0) >= least]
    return max(fit, key=lambda kr: kr[1]["ruler"], default=None)


def checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for question in QUESTIONS:
        rows = data[question]["rows"]
        if "full" not in rows:
            continue
        full = rows["full"]["ruler"]
        for dtype in ("int8", "fp8"):
            r = rows.get(f"full+{dtype}")
            if r:
                out.append({"question": question, "target": f"full at {dtype} within 1 point of full",
                            "measured": f"{r['ruler']:.1f} vs {full:.1f} ({r['ruler'] - full:+.1f}), "
                                        f"{100 * r['kv_removed']:.1f}% of the bytes removed",
                            "met": abs(r["ruler"] - full) <= 1.0})
        for least, share, name in ((0.48, 0.95, "50%"), (0.73, 0.90, "75%")):
            if question == "after-context" and name == "75%":
                continue
            want = 0.90 if question == "after-context" else share
            best = best_at(rows, least)
            if best:
                label, r = best
                out.append({"question": question,
                            "target": f"best row at >= {100 * least:.0f}% of the bytes removed "
                                      f">= {100 * want:.0f}% of full",
                            "measured": f"{label}: {r['ruler']:.1f} = {100 * r['ruler'] / full:.1f}% of full "
                                        f"({100 * r['kv_removed']:.1f}% removed)",
                            "met": r["ruler"] >= want * full})
        cache_only = rows.get("pyramidinfer_54_floor@0.54")
        prune = rows.get("pyramidinfer_54_floor_prune@0.54")
        if cache_only and prune:
            out.append({"question": question, "target": "#27: prune-hidden within 3 points of cache-only",
                        "measured": f"{prune['ruler']:.1f} vs {cache_only['ruler']:.1f} "
                                    f"({prune['ruler'] - cache_only['ruler']:+.1f}); removed "
                                    f"{100 * prune['kv_removed']:.1f}% vs {100 * cache_only['kv_removed']:.1f}%",
                        "met": prune["ruler"] >= cache_only["ruler"] - 3})
        needle = data[question]["needle"]
        a, b = needle.get("pyramidinfer_54_floor@0.54"), needle.get("pyramidinfer_54_floor_prune@0.54")
        if a and b:
            out.append({"question": question, "target": "#27: needles as the cache-only preset finds them",
                        "measured": f"prune {b['accuracy']:.3f} vs cache-only {a['accuracy']:.3f} "
                                    f"(full {needle.get('full', {}).get('accuracy', float('nan')):.3f})",
                        "met": b["accuracy"] >= a["accuracy"]})
    return out


def markdown(data: dict[str, Any], checked: list[dict]) -> str:
    lines = []
    for question in QUESTIONS:
        q = data[question]
        if not q["rows"]:
            continue
        tasks = sorted({t for r in q["rows"].values() for t in r["tasks"]})
        lines += [f"### Question {question}", "",
                  f"`full`'s score in each of the {len(q['full_scores_per_process'])} processes: "
                  + ", ".join(f"{s:.1f}" for s in q["full_scores_per_process"]), "",
                  "| row | kv_dtype | KV bytes removed | RULER-style score | % of full | " + " | ".join(tasks) + " |",
                  "|---|---|---|---|---|" + "---|" * len(tasks)]
        order = sorted(q["rows"].items(), key=lambda kr: (kr[1]["kv_removed"] or 0, kr[0]))
        for label, r in order:
            share = 100 * r["ruler"] / q["rows"]["full"]["ruler"] if "full" in q["rows"] else float("nan")
            cells = " | ".join(f"{r['tasks'].get(t, float('nan')):.1f}" for t in tasks)
            lines.append(f"| `{label}` | {r['kv_dtype']} | {100 * (r['kv_removed'] or 0):.1f}% | {r['ruler']:.1f} | "
                         f"{share:.1f}% | {cells} |")
        if q["needle"]:
            lines += ["", "Passkey needle task (`--tasks needle --sizes large`):", "",
                      "| row | KV bytes removed | needle accuracy |", "|---|---|---|"]
            for label, r in q["needle"].items():
                lines.append(f"| `{label}` | {100 * (r['kv_removed'] or 0):.1f}% | {r['accuracy']:.3f} |")
        lines.append("")
    lines += ["### Against the targets", "", "| question | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {c['question']} | {c['target']} | {c['measured']} | {'yes' if c['met'] else '**no**'} |"
              for c in checked]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    markers = {"auto": "o", "int8": "s", "fp8": "^"}
    for ax, question in zip(axes, QUESTIONS, strict=True):
        for label, r in data[question]["rows"].items():
            ax.scatter(100 * (r["kv_removed"] or 0), r["ruler"], marker=markers.get(r["kv_dtype"], "x"))
            ax.annotate(label, (100 * (r["kv_removed"] or 0), r["ruler"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_title(f"question {question}")
        ax.set_xlabel("KV bytes removed after the prompt (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("RULER-style score (o bf16, s int8, ^ fp8)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    data = read(args.folder)
    checked = checks(data)
    text = markdown(data, checked)
    if args.json:
        args.json.write_text(json.dumps({"conditions": data, "checks": checked,
                                         "report_command": " ".join(["python", *sys.argv])}, indent=1))
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        plot(data, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
