"""Does ``kv_dtype`` int8/fp8 change what ``full`` computes by more than the noise floor (issue #25)?

The RULER-style score of 80 GPU samples cannot tell whether ``full`` at int8 is within 1 point of ``full`` at
bf16 (one sample is 1.25 points). This measures it per token instead, with ``benchmarks/prune_diagnosis.py``'s
functions (imported, not copied): on the samples that script used (the suite's, seed 0, the first ``--samples``
per task with the question in the prompt and ``--after-samples`` after the context), every mode runs greedy on one
prompt at a time and is scored like the suite, and is then teacher-forced along ``full``'s greedy answer: top-1
equal to ``full``'s token, the same at the answer's digits, the KL divergence from ``full``'s distribution, and
the tokens before the first disagreement. The noise floor is ``full`` (auto) against itself, as prune_diagnosis.py
computes it (its teacher-forced multi-token forward against its own one-token greedy decode, in bf16). KV bytes
are ``cache.memory_bytes(allocated=False)`` after the prefill, relative to ``full`` at auto.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/kv_dtype_agreement.py --samples 6 --after-samples 3 \\
        --threads 1 --json docs/benchmarks/kv_dtype_agreement.json --md docs/benchmarks/kv_dtype_agreement.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_diagnosis import (  # noqa: E402
    CACHE_ONLY,
    agreement,
    common_arguments,
    mean,
    pct,
    run_mode,
    run_suite,
    summarize,
    teacher_forced,
    write_tables,
)

from kvpolicy import make_cache  # noqa: E402

#: row name -> (preset, kv_dtype, compressed); the first is the reference
MODES = {
    "full": ("full", "auto", False),
    "full+int8": ("full", "int8", False),
    "full+fp8": ("full", "fp8", False),
    CACHE_ONLY: (CACHE_ONLY, "auto", True),
    f"{CACHE_ONLY}+int8": (CACHE_ONLY, "int8", True),
}
BEGIN, END = "<!-- kv_dtype_agreement.py tables: begin -->", "<!-- kv_dtype_agreement.py tables: end -->"


def compare(model, tokenizer, sample, after: bool, ratio: float, stops: set[int]) -> dict:
    runs = {}
    for name, (preset, kv_dtype, compressed) in MODES.items():
        extra = {"compression_ratio": ratio} if compressed else {}
        cache = make_cache(preset, kv_dtype=kv_dtype, compiled_decode=False, **extra)
        runs[name] = run_mode(model, tokenizer, sample, name, cache, after, stops)
    full = runs["full"]
    reference = full.tokens
    digit = [tokenizer.decode([t]).strip().isdigit() for t in reference]
    ref_logp = teacher_forced(model, full, reference)
    modes = {}
    for name, run in runs.items():
        modes[name] = {"score": run.score, "answer": run.answer.strip()[:120],
                       "same_answer": run.answer.strip() == full.answer.strip(), "kv_bytes": run.kv_bytes,
                       "kv_removed": round(1 - run.kv_bytes / full.kv_bytes, 4), "seconds": round(run.seconds, 2),
                       **agreement(ref_logp, teacher_forced(model, run, reference), reference, digit)}
        run.snapshot = None
    return {**sample.record(), "question": "after_context" if after else "in_prompt",
            "prompt_tokens": len(sample.context_ids if after else sample.ids), "full_tokens": len(reference),
            "modes": modes, "layers": [], "cut_layer": None}


def summary(results: list[dict]) -> dict:
    """prune_diagnosis's per-mode means, plus the share of answers equal to full's and the paired score changes."""
    table = summarize(results)["modes"]
    for name, entry in table.items():
        pairs = [(r["modes"]["full"]["score"], r["modes"][name]["score"]) for r in results]
        entry["same_answer"] = mean(r["modes"][name]["same_answer"] for r in results)
        entry["answers_changed"] = sum(not r["modes"][name]["same_answer"] for r in results)
        entry["worse"] = sum(b < a for a, b in pairs)
        entry["better"] = sum(b > a for a, b in pairs)
        entry["kv_relative"] = round(1 - entry["kv_removed"], 4)
    return table


def markdown(summaries: dict[str, dict]) -> str:
    out = []
    for question, table in summaries.items():
        tasks = list(table["full"]["per_task"])
        n = table["full"]["samples"]
        out.append(f"### Question {question.replace('_', ' ')} ({n} samples; one sample is "
                   f"{100 / n:.1f} points of the score)\n")
        out.append("| mode | score | " + " | ".join(t.removeprefix("niah_") for t in tasks)
                   + " | answer = full's | worse / better than full | top-1 along full's answer | top-1 at its digits "
                   "| KL mean | tokens before 1st miss | KV bytes vs full |")
        out.append("|---" * (9 + len(tasks)) + "|")
        for name, m in table.items():
            cells = " | ".join(pct(m["per_task"][t]) for t in tasks)
            label = f"`{name}` (noise floor)" if name == "full" else f"`{name}`"
            same = f"{m['samples'] - m['answers_changed']}/{m['samples']}"
            out.append(f"| {label} | {pct(m['score'])} | {cells} | {same} "
                       f"| {m['worse']} / {m['better']} | {pct(m['top1_agreement'])}% | {pct(m['digit_agreement'])}% "
                       f"| {m['kl_mean']:.4f} | {m['prefix_tokens']:.1f} | {m['kv_relative']:.3f} |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6, help="samples per task, question in the prompt")
    ap.add_argument("--after-samples", type=int, default=3, help="samples per task, question after the context")
    common_arguments(ap)
    args = ap.parse_args(argv)
    if args.tables_from:
        write_tables(args.md, markdown(json.loads(args.tables_from.read_text())["summary"]), (BEGIN, END))
        return 0

    def report(question: str, table: dict) -> None:
        for name, m in table.items():
            print(f"{question} {name}: score {pct(m['score'])} same answer {pct(m['same_answer'], 0)}% "
                  f"top-1 {pct(m['top1_agreement'])}% digits {pct(m['digit_agreement'])}% KL {m['kl_mean']:.4f} "
                  f"KV {m['kv_relative']:.3f}", flush=True)

    plans = [("in_prompt", args.samples, None), ("after_context", args.after_samples, None)]
    run_suite(args, "benchmarks/kv_dtype_agreement.py", argv, plans,
              lambda model, tok, sample, after, _, stops: compare(model, tok, sample, after, args.ratio, stops),
              summary, report, markdown, (BEGIN, END),
              modes={k: {"preset": p, "kv_dtype": d, "compression_ratio": args.ratio if c else None}
                     for k, (p, d, c) in MODES.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
