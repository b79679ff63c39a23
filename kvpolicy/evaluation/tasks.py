"""The three quality tasks of ``kvpolicy compare``: perplexity, needle retrieval, agreement.

Why three: each catches a different failure of a compression policy. ``ppl`` measures how
much worse the model predicts real text once the cache decides what later tokens see;
``needle`` whether one specific early fact survives eviction; ``agreement`` how far greedy
generation drifts from the uncompressed model's. All inputs are built once per run from a
seed (same inputs for every policy), and every size lives in :class:`EvalSizes`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from . import texts
from .measure import Meter
from .ruler.config import DEFAULT_TASKS as RULER_DEFAULT_TASKS

CacheFactory = Callable[[], Any]


@dataclass(frozen=True)
class EvalSizes:
    """Every size of the evaluation (the defaults are 2k-token contexts; the ``small`` preset, the
    default of ``compare``, halves them to keep it within minutes on CPU)."""

    seed: int = 0
    batch_size: int = 1
    # the prose of every task (kvpolicy.evaluation.texts): "austen", "python-docs", or "auto" (the
    # novels where installed, else the Python docs; the CLI records the source it resolved to)
    texts: str = "auto"
    # ppl: documents of ppl_prefix + ppl_tokens tokens; the last ppl_tokens are scored ppl_step at a time
    ppl_docs: int = 1
    ppl_prefix: int = 2048
    ppl_tokens: int = 128
    ppl_step: int = 8
    # needle: haystacks of these token lengths, needle at these depths (fractions), samples cycle the grid
    needle_samples: int = 3
    needle_lengths: tuple[int, ...] = (1024, 2048)
    needle_depths: tuple[float, ...] = (0.25, 0.75)
    needle_answer_tokens: int = 14
    # agreement: prompts of this many tokens, greedy continuation of max_new_tokens
    agreement_prompts: int = 2
    agreement_prompt_tokens: int = 2048
    max_new_tokens: int = 24
    # needle and ruler: where the question is. "in_prompt": one prompt, compressed with the question
    # in it; "after_context": the document is compressed alone, then the question continues the cache
    # (compress once, ask many)
    question: str = "in_prompt"
    # ruler: the RULER-style suite (kvpolicy.evaluation.ruler): its tasks, target lengths in the
    # model's tokens, samples per task and length, and haystack text file (None: the ``texts`` above)
    ruler_tasks: tuple[str, ...] = RULER_DEFAULT_TASKS
    ruler_lengths: tuple[int, ...] = (4096,)
    ruler_samples: int = 5
    ruler_haystack: str | None = None
    # rows per prefill forward of a batch (None: the whole batch at once; see kvpolicy.prefill)
    prefill_rows: int | None = None

    def replace(self, **changes: Any) -> EvalSizes:
        data = asdict(self)
        data.update({k: v for k, v in changes.items() if v is not None})
        return EvalSizes(**data)

    def __post_init__(self) -> None:
        if self.texts not in texts.CHOICES:
            raise ValueError(f"texts must be one of {', '.join(texts.CHOICES)}, not {self.texts!r}")
        if self.question not in QUESTION_POSITIONS:
            raise ValueError(f"question must be one of {', '.join(QUESTION_POSITIONS)}, not {self.question!r}")


QUESTION_POSITIONS = ("in_prompt", "after_context")


PRESETS: dict[str, EvalSizes] = {
    "tiny": EvalSizes(ppl_docs=1, ppl_prefix=96, ppl_tokens=16, needle_samples=2, needle_lengths=(64, 96),
                      agreement_prompts=1, agreement_prompt_tokens=96, max_new_tokens=6, needle_answer_tokens=4,
                      ruler_lengths=(384,), ruler_samples=1),
    # the default (the README's main job, set-up included, in 10 minutes on 2 CPU cores): 1k-token
    # contexts; at 2k (EvalSizes() as it is) a run took 880-1240 s of CPU time (docs/benchmarks/default_compare.md)
    "small": EvalSizes(ppl_prefix=1024, needle_lengths=(1024,), agreement_prompts=1, agreement_prompt_tokens=1024),
    "sweep": EvalSizes(needle_samples=4, agreement_prompts=1, max_new_tokens=32),
    "needle": EvalSizes(needle_samples=12, needle_lengths=(1024,), needle_depths=(0.1, 0.3, 0.5, 0.7)),
    "large": EvalSizes(ppl_docs=4, ppl_prefix=4096, ppl_tokens=256, needle_samples=12,
                       needle_lengths=(1024, 2048, 4096, 6144), needle_depths=(0.1, 0.5, 0.9),
                       agreement_prompts=4, agreement_prompt_tokens=4096, max_new_tokens=64),
}
SIZE_FIELDS = [f.name for f in fields(EvalSizes)]


@dataclass
class TaskResult:
    """Metrics of one task under one policy, plus what later policies compare against."""

    metrics: dict[str, float]
    reference: Any = None
    details: list[Any] = field(default_factory=list)
    #: more keys for the result row that are not single numbers (per-cell and per-sample results)
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """A task prepares its inputs once, then runs them under any cache factory."""

    name: str = ""
    #: the metric keys this task adds to a result row (documented in docs/cli.md)
    metric_keys: tuple[str, ...] = ()
    #: the key plotted against KV reduction, and whether higher is better
    headline: str = ""
    higher_is_better: bool = True
    #: progress steps of one run (batches, for a long task); the runner calls ``on_unit`` after each
    #: when there are several, so a progress bar moves within the task
    units: int = 1
    on_unit: Callable[[], None] | None = None

    @classmethod
    def columns(cls, rows: list[dict[str, Any]]) -> list[str]:
        """The row keys a table shows for this task (its metric keys; a task may add per-part keys)."""
        return list(cls.metric_keys)

    @classmethod
    def title(cls, key: str) -> str:
        """A column's heading in the printed table (the key itself unless the task shortens it)."""
        return key

    def prepare(self, tokenizer: Any, sizes: EvalSizes) -> None:
        raise NotImplementedError

    def run(self, model: Any, new_cache: CacheFactory, meter: Meter, reference: Any) -> TaskResult:
        raise NotImplementedError


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class PerplexityTask(Task):
    name = "ppl"
    metric_keys = ("ppl", "ppl_ratio")
    headline = "ppl_ratio"
    higher_is_better = False

    def prepare(self, tokenizer: Any, sizes: EvalSizes) -> None:
        self.sizes = sizes
        self.docs = texts.token_documents(
            tokenizer, sizes.ppl_docs, sizes.ppl_prefix + sizes.ppl_tokens + 1, sizes.seed, texts.source(sizes.texts)
        )

    def run(self, model: Any, new_cache: CacheFactory, meter: Meter, reference: Any) -> TaskResult:
        nll, count = 0.0, 0
        device = model.device
        for group in _batches(self.docs, self.sizes.batch_size):
            ids = torch.tensor(group, device=device)
            n, c = meter.score(model, ids, self.sizes.ppl_prefix, self.sizes.ppl_step, new_cache())
            nll, count = nll + n, count + c
        ppl = math.exp(nll / count)
        # the reference run (``full``, reference None) is measured against itself like every other
        # row, not given 1.0: a non-finite reference shows as such instead of as a perfect ratio
        reference_ppl = ppl if reference is None else reference
        return TaskResult({"ppl": ppl, "ppl_ratio": ppl / reference_ppl}, reference=reference_ppl)


def _chat_ids(tokenizer: Any, user: str) -> list[int]:
    """Token ids of a one-turn chat prompt (the instruct model's template when it has one)."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    return tokenizer(user + "\nAnswer:", add_special_tokens=True)["input_ids"]


def _chat_split_ids(tokenizer: Any, context: str, question: str) -> tuple[list[int], list[int]]:
    """The one-turn chat prompt of ``context + question``, as the tokens up to the end of the context
    and the tokens from the question on (the chat template's closing and answer header included)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + question}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = (tokenizer.bos_token or "") + context + question + "\nAnswer:"
    cut = text.rindex(question)
    first = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    rest = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
    return list(first), list(rest)


def _left_pad(rows: list[list[int]], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


class NeedleTask(Task):
    name = "needle"
    metric_keys = ("needle_accuracy",)
    headline = "needle_accuracy"

    QUESTION = "What is the secret passkey hidden in the text above? Answer with the number only."

    def prepare(self, tokenizer: Any, sizes: EvalSizes) -> None:
        self.sizes, self.tokenizer = sizes, tokenizer
        source = texts.source(sizes.texts)
        rng = random.Random(sizes.seed + 1)
        grid = [(n, d) for n in sizes.needle_lengths for d in sizes.needle_depths]
        self.samples: list[dict[str, Any]] = []
        for k in range(sizes.needle_samples):
            length, depth = grid[k % len(grid)]
            secret = str(rng.randrange(10000, 100000))
            paras = texts.haystack(tokenizer, length, rng, source)
            where = min(len(paras), max(0, round(depth * len(paras))))
            needle = f"The secret passkey is {secret}. Remember it: the secret passkey is {secret}."
            body = "\n\n".join(paras[:where] + [needle] + paras[where:])
            document = f"Below is an extract from {source.extract_of}. A secret passkey is hidden in it.\n\n{body}\n\n"
            sample = {"secret": secret, "length": length, "depth": depth}
            if sizes.question == "in_prompt":
                sample["ids"] = _chat_ids(tokenizer, document + self.QUESTION)
            else:
                sample["context"], sample["question"] = _chat_split_ids(tokenizer, document, self.QUESTION)
                sample["ids"] = sample["context"] + sample["question"]
            self.samples.append(sample)

    def run(self, model: Any, new_cache: CacheFactory, meter: Meter, reference: Any) -> TaskResult:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        correct, details = 0, []
        for group in _batches(self.samples, self.sizes.batch_size):
            context = None
            if self.sizes.question == "after_context":
                context = _left_pad([s["context"] for s in group], pad, model.device)
                question = torch.tensor([s["question"] for s in group], device=model.device)  # the same text
                inputs = {"input_ids": torch.cat([context["input_ids"], question], 1),
                          "attention_mask": torch.cat([context["attention_mask"], torch.ones_like(question)], 1)}
            else:
                inputs = _left_pad([s["ids"] for s in group], pad, model.device)
            out = meter.generate(model, inputs, new_cache(), self.sizes.needle_answer_tokens, pad, context=context)
            for s, row in zip(group, out.tolist()):
                answer = self.tokenizer.decode(row, skip_special_tokens=True)
                found = re.search(r"\d+", answer)
                ok = found is not None and found.group(0) == s["secret"]
                correct += ok
                details.append({"length": s["length"], "depth": s["depth"], "ok": bool(ok), "answer": answer.strip()})
        return TaskResult({"needle_accuracy": correct / len(self.samples)}, details=details)


class AgreementTask(Task):
    """``agreement``: share of generated positions equal to full's; ``agreement_prefix``: share
    generated before the first difference (position-wise agreement is near 0 after an early
    divergence even when both continuations are fine, so both are reported)."""

    name = "agreement"
    metric_keys = ("agreement", "agreement_prefix")
    headline = "agreement"

    def prepare(self, tokenizer: Any, sizes: EvalSizes) -> None:
        self.sizes, self.tokenizer = sizes, tokenizer
        self.prompts = texts.token_documents(
            tokenizer, sizes.agreement_prompts, sizes.agreement_prompt_tokens, sizes.seed + 2, texts.source(sizes.texts)
        )

    def run(self, model: Any, new_cache: CacheFactory, meter: Meter, reference: Any) -> TaskResult:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        outputs: list[list[int]] = []
        for group in _batches(self.prompts, self.sizes.batch_size):
            inputs = _left_pad(group, pad, model.device)
            outputs.extend(meter.generate(model, inputs, new_cache(), self.sizes.max_new_tokens, pad).tolist())
        if reference is None:  # the reference run is compared with its own outputs, like every other row
            reference = outputs
        total = sum(len(r) for r in reference)
        same = sum(a == b for out, ref in zip(outputs, reference) for a, b in zip(out, ref))
        prefix = 0
        for out, ref in zip(outputs, reference):
            diverged = [i for i, (a, b) in enumerate(zip(out, ref)) if a != b]
            prefix += diverged[0] if diverged else len(ref)
        return TaskResult({"agreement": same / total, "agreement_prefix": prefix / total}, reference=outputs)


from .ruler.task import RulerTask  # noqa: E402 - it subclasses Task, defined above

TASKS: dict[str, type[Task]] = {
    "ppl": PerplexityTask, "needle": NeedleTask, "agreement": AgreementTask, "ruler": RulerTask,
}
