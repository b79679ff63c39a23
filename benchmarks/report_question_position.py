"""Side by side: needle accuracy with the question in the prompt and after the compressed context.

Reads ``kvpolicy compare --tasks needle`` results files of the two modes (``--question in-prompt``
and ``--question after-context``; several files per mode are merged, later rows winning) and
prints a Markdown table: accuracy per mode, its share of ``full``'s in that mode, and the KV removed
after prefill.

    python benchmarks/report_question_position.py --in-prompt a.json b.json --after-context c.json d.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(paths: list[Path], mode: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in paths:
        data = json.loads(path.read_text())
        if data["meta"]["sizes"]["question"] != mode:
            raise SystemExit(f"{path}: recorded with --question {data['meta']['sizes']['question']}, not {mode}")
        for row in data["rows"]:
            out[row["label"]] = row
    return out


def table(in_prompt: dict[str, dict], after: dict[str, dict]) -> str:
    full_in, full_after = in_prompt["full"]["needle_accuracy"], after["full"]["needle_accuracy"]
    lines = [
        "| policy | KV removed (prefill): in prompt / after | needle, question in prompt | of full "
        "| needle, question after context | of full |",
        "|---|---|---|---|---|---|",
    ]

    def share(x: float, ref: float) -> str:
        return f"{x / ref:.0%}" if ref else "-"

    for label in [k for k in in_prompt if k in after]:
        a, b = in_prompt[label], after[label]
        removed = f"{a['kv_reduction_prefill']:.0%} / {b['kv_reduction_prefill']:.0%}"
        lines.append(f"| `{label}` | {removed} | {a['needle_accuracy']:.2f} | {share(a['needle_accuracy'], full_in)} "
                     f"| {b['needle_accuracy']:.2f} | {share(b['needle_accuracy'], full_after)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-prompt", nargs="+", type=Path, required=True)
    ap.add_argument("--after-context", nargs="+", type=Path, required=True)
    args = ap.parse_args(argv)
    print(table(rows_of(args.in_prompt, "in_prompt"), rows_of(args.after_context, "after_context")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
