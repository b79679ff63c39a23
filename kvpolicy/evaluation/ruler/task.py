"""``ruler``: the RULER-style suite as a task of ``kvpolicy compare`` (``--suite ruler``).

Why it runs the way it does:

* Samples of one length are batched together whatever their task (``--batch-size``), so a GPU
  run of the whole grid is a few large batches per policy. Each batch generates up to the
  largest answer budget in it and stops when every row has ended its answer; each row's answer
  is then cut to its own task's budget, which is what a run of that task alone would have kept.
* With ``--question after-context`` the context is compressed alone and the question continues
  the same cache; rows of a batch must then have questions of one length, so batches are
  grouped by question length too.
* Decoding is eager (``compiled_decode=False``): every batch has other shapes, and a compiled
  step would be recompiled for each.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from ..task_base import CacheFactory, EvalSizes, Task, TaskResult, left_pad
from .config import ruler_config
from .generators import TASK_NAMES
from .scoring import binomial_stderr, copy_baseline, string_match_all
from .suite import RulerSample, generate

#: characters of each answer kept in the results file (enough to see what went wrong)
ANSWER_CHARS = 200


def plan_batches(samples: list[RulerSample], batch_size: int, by_question_length: bool) -> list[list[RulerSample]]:
    """Batches of at most ``batch_size`` samples of one target length (and one question length when
    ``by_question_length``), longest prompts first so rows of a batch need little padding."""
    groups: dict[tuple[int, int], list[RulerSample]] = {}
    for s in samples:
        groups.setdefault((s.length, len(s.question_ids) if by_question_length else 0), []).append(s)
    batches = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda s: -s.tokens)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def _stop_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}


class RulerTask(Task):
    name = "ruler"
    metric_keys = ("ruler_score", "ruler_score_ratio")
    headline = "ruler_score"

    @classmethod
    def columns(cls, rows: list[dict[str, Any]]) -> list[str]:
        """The suite's score and its ratio to ``full``'s, then each RULER task's score."""
        present = [t for t in TASK_NAMES if rows and f"ruler_{t}" in rows[0]]
        return [*cls.metric_keys, *(f"ruler_{t}" for t in present)]

    @classmethod
    def title(cls, key: str) -> str:
        """Short headings, so a table of every task fits a terminal: ``ruler``, ``/full``, ``multikey``..."""
        short = {"ruler_score": "ruler", "ruler_score_ratio": "/full"}
        return short.get(key, key.removeprefix("ruler_").removeprefix("niah_"))

    def prepare(self, tokenizer: Any, sizes: EvalSizes) -> None:
        self.sizes, self.tokenizer = sizes, tokenizer
        self.config = ruler_config(tasks=sizes.ruler_tasks, lengths=sizes.ruler_lengths,
                                   samples=sizes.ruler_samples, seed=sizes.seed, haystack=sizes.ruler_haystack,
                                   texts=sizes.texts)
        self.samples = generate(tokenizer, self.config)
        self.chance = {(s.task, s.length, s.index): copy_baseline(s.body, s.answers, tokenizer, s.max_new_tokens)
                       for s in self.samples}
        self.batches = plan_batches(self.samples, sizes.batch_size, sizes.question == "after_context")
        self.units = len(self.batches)

    def _inputs(self, batch: list[RulerSample], pad: int, device: Any) -> tuple[dict, dict | None]:
        if self.sizes.question != "after_context":
            return left_pad([s.ids for s in batch], pad, device), None
        context = left_pad([s.context_ids for s in batch], pad, device)
        question = torch.tensor([s.question_ids for s in batch], device=device)  # one length per batch
        inputs = {"input_ids": torch.cat([context["input_ids"], question], 1),
                  "attention_mask": torch.cat([context["attention_mask"], torch.ones_like(question)], 1)}
        return inputs, context

    def run(self, model: Any, new_cache: CacheFactory, meter: Any, reference: Any) -> TaskResult:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        stops = _stop_ids(self.tokenizer, model)
        results: list[dict[str, Any]] = []
        for batch in self.batches:
            cache = new_cache()
            if hasattr(cache, "compiled_decode"):
                cache.compiled_decode = False
            inputs, context = self._inputs(batch, pad, model.device)
            out = meter.generate(model, inputs, cache, max(s.max_new_tokens for s in batch), pad, context=context,
                                 stop_at_eos=True, prefill_rows=self.sizes.prefill_rows)
            for s, row in zip(batch, out.tolist()):
                row = row[: s.max_new_tokens]
                end = next((i for i, t in enumerate(row) if t in stops), len(row))
                answer = self.tokenizer.decode(row[:end], skip_special_tokens=True)
                results.append({**s.record(), "score": string_match_all(answer, s.answers),
                                "chance": self.chance[(s.task, s.length, s.index)],
                                "answer": answer.strip()[:ANSWER_CHARS]})
            if self.on_unit:
                self.on_unit()
        return summarize(results, reference)


def summarize(results: list[dict[str, Any]], reference: float | None) -> TaskResult:
    """Per-sample scores to the row's metrics: ``ruler_score`` (the mean over tasks of each task's
    mean over its lengths and samples, RULER's average), its ratio to the reference's (``full``:
    its own score, so 1.0, or NaN when it scored 0), each task's score, and one cell per task and
    length with its binomial standard error and the copy baseline's score (``chance``)."""
    cells: dict[tuple[str, int], list[float]] = {}
    chance: dict[tuple[str, int], list[float]] = {}
    for r in results:
        cells.setdefault((r["task"], r["length"]), []).append(r["score"])
        chance.setdefault((r["task"], r["length"]), []).append(r.get("chance", math.nan))
    tasks = [t for t in TASK_NAMES if any(k[0] == t for k in cells)]
    per_task = {t: statistics.mean(x for (task, _), xs in cells.items() if task == t for x in xs) for t in tasks}
    score = statistics.mean(per_task.values())
    ref = score if reference is None else reference
    metrics = {"ruler_score": score, "ruler_score_ratio": score / ref if ref else float("nan")}
    metrics.update({f"ruler_{t}": v for t, v in per_task.items()})
    cell_rows = [{"task": t, "length": n, "samples": len(xs), "score": statistics.mean(xs),
                  "stderr": binomial_stderr(statistics.mean(xs), len(xs)), "chance": statistics.mean(chance[(t, n)])}
                 for (t, n), xs in sorted(cells.items(), key=lambda kv: (TASK_NAMES.index(kv[0][0]), kv[0][1]))]
    return TaskResult(metrics, reference=score, details=results,
                      extra={"ruler_cells": cell_rows, "ruler_samples": results})
