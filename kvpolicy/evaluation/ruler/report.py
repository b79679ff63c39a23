"""Tables of RULER-style results: what docs/benchmarks/ruler.md shows, from ``--json`` files.

Why its own module: a suite run's rows carry cells (task x length) and per-sample scores that the
generic ``compare`` table does not show, and the issue's targets (share of ``full``'s score kept
at 50% and 75% removed, PyramidInfer against the best) are read off the same rows.

    python -m kvpolicy.evaluation.ruler.report run1.json [run2.json ...] --markdown [--plot out.png]

merges the files (later rows replace earlier ones of the same label, as ``report.merge_runs``)
and prints the tables; samples are the same in every file of one seed, so runs split by policy,
task or length combine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from .. import report as base
from .generators import TASK_NAMES

#: the issue's targets: the best policy keeps this share of full's score at this ratio
KEEP_TARGETS = {0.5: 0.95, 0.75: 0.90}
#: PyramidInfer within this many points (of score, in %) of the best policy at 50% removed
PYRAMIDINFER_GAP = 5.0
#: a row counts at a target's ratio only if the KV bytes it removed after prefill are within this of it
#: (a policy whose layers are as wide as their fullest head, kvzip's shared ranking, removes fewer bytes
#: than tokens: judged by its label it would be compared with policies holding far less memory)
RATIO_SLACK = 0.02


def _removed(row: dict[str, Any]) -> float:
    """The share of the KV bytes ``row`` removed after prefill (its end-of-run share in older files)."""
    return row.get("kv_reduction_prefill", row.get("kv_reduction", 0.0))


def at_ratio(rows: list[dict[str, Any]], ratio: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(rows that removed at least ratio - RATIO_SLACK of the KV bytes, whatever ratio they were run at;
    the rows run at ratio that removed less)``: "at 50% removed" is judged by the memory a row saved, so a
    row run at 0.75 that saved 55% counts at 0.5 and one run at 0.5 that saved 29% does not; a row that saved
    its bytes by storing fewer bits alone (``full+int4``, run at no ratio) counts too."""
    saves = [r for r in rows if r["ratio"] is not None or r.get("kv_dtype", "auto") != "auto"]
    met = [r for r in saves if _removed(r) >= ratio - RATIO_SLACK]
    return met, [r for r in rows if r["ratio"] == ratio and r not in met]


def _is_kvpress(row: dict[str, Any]) -> bool:
    """kvpress's rows in a ``benchmarks/kvpress_compare.py`` file: the other library, never "the best kvpolicy
    policy"."""
    return row["label"].startswith("kvpress:")


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def merge_cells(rows: list[dict[str, Any]]) -> None:
    """Recompute each row's cells and scores from its per-sample results (after merging files whose
    rows ran different tasks or lengths of the same samples, rows may carry several runs' samples)."""
    from .task import summarize

    ref = next((r for r in rows if r["policy"] == "full" and r["ratio"] is None), None)
    ref_score = None
    if ref is not None:
        ref_score = summarize(ref["ruler_samples"], None).reference
    for row in rows:
        result = summarize(row["ruler_samples"], None if row is ref else ref_score)
        row.update(result.metrics)
        row.update(result.extra)


def cells_table(row: dict[str, Any]) -> str:
    """One row's score per task and length, with the binomial standard error, the sample count and
    the copy baseline (chance), in points."""
    lengths = sorted({c["length"] for c in row["ruler_cells"]})
    cells = {(c["task"], c["length"]): c for c in row["ruler_cells"]}
    head = ["task"] + [f"{n} tokens" for n in lengths] + ["chance (copy)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in TASK_NAMES:
        if not any((task, n) in cells for n in lengths):
            continue
        out = [task]
        for n in lengths:
            c = cells.get((task, n))
            out.append("-" if c is None else f"{_pct(c['score'])} ± {_pct(c['stderr'])} (n={c['samples']})")
        chance = [cells[(task, n)]["chance"] for n in lengths if (task, n) in cells]
        out.append(_pct(statistics.mean(chance)) if chance else "-")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """Suite score (points) per policy line and ratio, the measured KV removed beside it."""
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    lines_ = list(dict.fromkeys(base.series(r) for r in rows if r["policy"] != "full"))
    head = ["policy"] + [f"{x:g}" for x in ratios]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full = next((r for r in rows if r["policy"] == "full"), None)
    if full is not None:
        out.append("| full | " + " | ".join([f"{_pct(full['ruler_score'])} (0%)"] * len(ratios)) + " |")
    for name in lines_:
        cells = []
        for x in ratios:
            r = next((r for r in rows if base.series(r) == name and r["ratio"] == x), None)
            cells.append("-" if r is None else f"{_pct(r['ruler_score'])} ({100 * r['kv_reduction_prefill']:.0f}%)")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def task_table(rows: list[dict[str, Any]], ratio: float) -> str:
    """Each policy's score per task at one ratio (points), full first."""
    chosen = [r for r in rows if r["policy"] == "full" or r["ratio"] == ratio]
    tasks = [t for t in TASK_NAMES if chosen and f"ruler_{t}" in chosen[0]]
    head = ["policy", "KV removed", "suite"] + tasks
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in chosen:
        out.append("| " + " | ".join([r["label"], f"{100 * r['kv_reduction_prefill']:.1f}%", _pct(r["ruler_score"])]
                                     + [_pct(r[f"ruler_{t}"]) for t in tasks]) + " |")
    return "\n".join(out)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each as a line saying met or missed, with the numbers: kvpolicy's best row
    against ``full`` and PyramidInfer against that best; where the file has kvpress rows, kvpolicy's best
    against kvpress's best at each ratio run."""
    full = next((r for r in rows if r["policy"] == "full"), None)
    if full is None or not full["ruler_score"]:
        return ["no full row with a score above 0: no target can be read"]
    lines = []
    ours = [r for r in rows if not _is_kvpress(r)]
    for ratio, keep in KEEP_TARGETS.items():
        at, short = at_ratio(ours, ratio)
        if at:
            best = max(at, key=lambda r: r["ruler_score"])
            share = best["ruler_score"] / full["ruler_score"]
            lines.append(f"at {ratio:g} removed the best policy, {best['label']} ({100 * _removed(best):.1f}% of the "
                         f"KV bytes removed), keeps {100 * share:.1f}% of full's score (target {100 * keep:.0f}%): "
                         f"{'met' if share >= keep else 'missed'}")
        elif short:
            lines.append(f"at {ratio:g} removed: no row removed {100 * (ratio - RATIO_SLACK):.0f}% of the KV bytes, "
                         "the target is not measured")
        for r in short:
            lines.append(f"not counted at {ratio:g}: {r['label']} removed {100 * _removed(r):.1f}% of the KV bytes "
                         f"(score {100 * r['ruler_score']:.1f})")
    at, _ = at_ratio(ours, 0.5)
    pyr = [r for r in at if r["policy"] == "pyramidinfer"]
    if at and pyr:
        best = max(at, key=lambda r: r["ruler_score"])
        top = max(pyr, key=lambda r: r["ruler_score"])
        gap = 100 * (best["ruler_score"] - top["ruler_score"])
        lines.append(f"at 0.5 removed {top['label']} is {gap:.1f} points below the best ({best['label']}; target "
                     f"{PYRAMIDINFER_GAP:g}): {'met' if gap <= PYRAMIDINFER_GAP else 'missed'}")
    theirs = [r for r in rows if _is_kvpress(r)]
    for ratio in sorted({r["ratio"] for r in theirs if r["ratio"] is not None}):
        mine, other = at_ratio(ours, ratio)[0], at_ratio(theirs, ratio)[0]
        if not mine or not other:
            continue
        a, b = (max(group, key=lambda r: r["ruler_score"]) for group in (mine, other))
        gap = 100 * (a["ruler_score"] - b["ruler_score"])
        lines.append(f"at {ratio:g} removed the best kvpolicy row, {a['label']} ({100 * a['ruler_score']:.1f}), "
                     f"against the best kvpress row, {b['label']} ({100 * b['ruler_score']:.1f}): "
                     + (f"met, {gap:.1f} points ahead" if gap >= 0 else f"missed, {-gap:.1f} points behind"))
    return lines


def markdown(rows: list[dict[str, Any]]) -> str:
    full = next((r for r in rows if r["policy"] == "full"), None)
    parts = []
    if full is not None:
        parts += ["### full cache: score per task and length (points ± binomial s.e.)", "", cells_table(full), ""]
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    if ratios:
        parts += ["### suite score per policy and ratio (points; KV removed after prefill)", "", ratio_table(rows), ""]
    for ratio in ratios:
        parts += [f"### per task at ratio {ratio:g}", "", task_table(rows, ratio), ""]
    if ratios:
        parts += ["### targets", ""] + [f"* {line}" for line in targets(rows)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvpolicy.evaluation.ruler.report", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="results files of compare --suite ruler --json")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--plot", type=Path, help="write the score vs KV removed plot here (PNG)")
    ap.add_argument("--json", type=Path, help="write the merged rows here, the files' meta blocks under 'merged'")
    args = ap.parse_args(argv)
    loaded = [base.load_results(p) for p in args.files]
    rows = merge_runs([r for _, r in loaded])
    base.validate_rows(rows, ["ruler"])
    if args.json:
        from ...provenance import run_meta

        meta = run_meta(["python", "-m", "kvpolicy.evaluation.ruler.report", *(argv or sys.argv[1:])],
                        tool="kvpolicy.evaluation.ruler.report",
                        merged=[{"file": p.name, "meta": m} for p, (m, _) in zip(args.files, loaded)])
        base.save_json(rows, args.json, meta)
    if args.plot:
        base.plot(rows, ["ruler"], args.plot)
    if args.markdown:
        print(markdown(rows))
    return 0


def merge_runs(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several suite runs as one: rows of the same label pool their samples (a sample run
    twice keeps the later run's result), other rows are appended; then every score is recomputed
    from the samples (:func:`merge_cells`)."""
    merged: dict[str, dict[str, Any]] = {}
    for rows in runs:
        for row in rows:
            if row["label"] not in merged:
                merged[row["label"]] = {**row, "ruler_samples": list(row["ruler_samples"])}
                continue
            into = merged[row["label"]]
            key = {(s["task"], s["length"], s["index"]): s for s in into["ruler_samples"]}
            key.update({(s["task"], s["length"], s["index"]): s for s in row["ruler_samples"]})
            into["ruler_samples"] = list(key.values())
    rows = list(merged.values())
    merge_cells(rows)
    return rows


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
