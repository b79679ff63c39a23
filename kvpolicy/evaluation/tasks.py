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
from typing import Any

import torch

from . import texts
from .measure import Meter
from .ruler.task import RulerTask
from .task_base import PRESETS, SIZE_FIELDS, CacheFactory, EvalSizes, Task, TaskResult, left_pad

__all__ = ["PRESETS", "SIZE_FIELDS", "TASKS", "AgreementTask", "EvalSizes", "NeedleTask", "PerplexityTask", "RulerTask",
           "Task", "TaskResult"]


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
                context = left_pad([s["context"] for s in group], pad, model.device)
                question = torch.tensor([s["question"] for s in group], device=model.device)  # the same text
                inputs = {"input_ids": torch.cat([context["input_ids"], question], 1),
                          "attention_mask": torch.cat([context["attention_mask"], torch.ones_like(question)], 1)}
            else:
                inputs = left_pad([s["ids"] for s in group], pad, model.device)
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
            inputs = left_pad(group, pad, model.device)
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



TASKS: dict[str, type[Task]] = {
    "ppl": PerplexityTask, "needle": NeedleTask, "agreement": AgreementTask, "ruler": RulerTask,
}
