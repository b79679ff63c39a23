"""Tables and a plot of benchmarks/ratio_form.sh's files: each policy's score in each condition.

    python benchmarks/report_ratio_form.py FOLDER --json docs/benchmarks/ratio_form.json \\
        --markdown docs/benchmarks/ratio_form_table.md --plot docs/benchmarks/ratio_form.png

FOLDER holds one folder per condition (``<texts>_<question>``) with the ``ruler_*.json`` and
``needle.json`` files of ``kvpolicy compare``. Per condition and policy: the RULER-style suite score
(points), its share of the same process's ``full`` row, the KV bytes removed after the prompt, and the
needle task's accuracy; then, per condition, how far each row is below the best row that removed at
least 48% of the bytes (the issue's "within 5 points of the best policy in the same run").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: a row counts as "at half the bytes" when it removed at least this share of the KV bytes after the prompt
AT_HALF = 0.48


def short(label: str) -> str:
    """``benchmarks/ratio_form/floor_voters1.yaml@0.5`` -> ``floor_voters1@0.5``."""
    name, _, ratio = label.partition("@")
    name = Path(name).stem if name.endswith((".yaml", ".yml", ".json")) else name
    return f"{name}@{ratio}" if ratio else name


def read_condition(folder: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("ruler_*.json")):
        data = json.loads(path.read_text())
        for row in data["rows"]:
            if row["label"] == "full" and "full" in rows:
                continue  # each process ran its own full row on the same samples: the first one is kept
            entry = rows.setdefault(short(row["label"]), {})
            entry.update(ruler=100 * row["ruler_score"], ruler_of_full=row.get("ruler_score_ratio"),
                         kv_removed=row.get("kv_reduction_prefill"), source=path.name,
                         tasks={k.removeprefix("ruler_"): 100 * v for k, v in row.items()
                                if k.startswith("ruler_niah")})
    needle = folder / "needle.json"
    if needle.exists():
        for row in json.loads(needle.read_text())["rows"]:
            entry = rows.setdefault(short(row["label"]), {})
            entry.update(needle=row.get("needle_accuracy"), needle_kv_removed=row.get("kv_reduction_prefill"))
    best = max((r["ruler"] for r in rows.values() if "ruler" in r and (r.get("kv_removed") or 0) >= AT_HALF),
               default=None)
    for r in rows.values():
        if best is not None and "ruler" in r:
            r["below_best"] = best - r["ruler"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    conditions = {d.name: read_condition(d) for d in sorted(args.folder.iterdir()) if d.is_dir()}
    if not conditions:
        print(f"no condition folders in {args.folder}", file=sys.stderr)
        return 2
    labels = list(dict.fromkeys(label for rows in conditions.values() for label in rows))
    names = list(conditions)

    def cell(rows: dict, label: str) -> str:
        r = rows.get(label, {})
        if "ruler" not in r:
            return "-"
        removed = r.get("kv_removed")
        text = f"{r['ruler']:.1f}"
        if removed is not None:
            text += f" ({100 * removed:.0f}%)"
        if r.get("needle") is not None:
            text += f", {round(12 * r['needle'])}/12"
        return text

    lines = ["| policy | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell(conditions[n], label) for n in names) + " |")
    lines += ["", "Points below the best row that removed at least 48% of the KV bytes, per condition:", "",
              "| policy | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in labels:
        vals = [conditions[n].get(label, {}).get("below_best") for n in names]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        runs = {}  # each process's provenance (command, machine, versions, source digest), as its file records it
        for d in sorted(args.folder.iterdir()):
            for path in sorted(d.glob("*.json")) if d.is_dir() else []:
                meta = json.loads(path.read_text())["meta"]
                runs[f"{d.name}/{path.name}"] = {k: meta.get(k) for k in
                                                  ("command", "machine", "versions", "source_digest", "date")}
        report = {"command": "python benchmarks/report_ratio_form.py " + " ".join(sys.argv[1:]), "runs": runs}
        args.json.write_text(json.dumps({"meta": report, "conditions": conditions, "at_half_bytes": AT_HALF},
                                        indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 5), sharey=True)
        for ax, n in zip(axes if len(names) > 1 else [axes], names):
            shown = [lb for lb in labels if "ruler" in conditions[n].get(lb, {})]
            ax.barh(range(len(shown)), [conditions[n][lb]["ruler"] for lb in shown],
                    color=["tab:green" if lb.startswith(("pyramidinfer", "floor", "ref")) else "tab:gray"
                           for lb in shown])
            ax.set_yticks(range(len(shown)), shown, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(n, fontsize=9)
            ax.set_xlabel("RULER-style score (points)")
        fig.suptitle("PyramidInfer shapes at compression_ratio 0.5 beside other policies (green: PyramidInfer)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
