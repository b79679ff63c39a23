"""Generate a RULER-style suite: every task x length x sample, deterministic from one seed.

Why a seed per sample (derived from the seed, task, length and index) rather than one RNG for the
run: a sample is then the same whatever other tasks, lengths or sample counts are asked for, so
runs of different sizes and runs split across machines share their samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .config import RulerConfig
from .generators import task_specs
from .haystack import Haystack, HaystackError
from .prompt import fit

#: draws of a sample whose secrets also occur in its haystack by chance are redone, this often at most
MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class RulerSample:
    """One prompt of the suite with what scores it. ``length`` is the target; ``tokens`` the prompt's
    real length in the model's tokens (within the config's tolerance below the target)."""

    task: str
    length: int
    seed: int
    index: int
    tokens: int
    answers: tuple[str, ...]
    context: str
    question: str
    answer_prefix: str
    context_ids: list[int] = field(repr=False)
    question_ids: list[int] = field(repr=False)
    max_new_tokens: int
    #: characters of ``context`` before the haystack part (instructions, vt's worked example)
    preamble_chars: int = 0
    #: strings the task put in the context exactly once, and word -> entries (word-list tasks)
    once: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def ids(self) -> list[int]:
        """The whole prompt (``question: in-prompt``)."""
        return self.context_ids + self.question_ids

    @property
    def body(self) -> str:
        """The haystack part of the context (needles, list or coded text included)."""
        return self.context[self.preamble_chars :]

    def record(self) -> dict[str, Any]:
        """What identifies the sample in a results file (no token ids, no texts)."""
        return {"task": self.task, "length": self.length, "seed": self.seed, "index": self.index,
                "tokens": self.tokens, "answers": list(self.answers)}


def sample_rng(seed: int, task: str, length: int, index: int, attempt: int = 0) -> random.Random:
    """The RNG of one sample (a string seed is hashed with SHA-512: stable across runs and machines)."""
    return random.Random(f"kvpolicy-ruler/{seed}/{task}/{length}/{index}/{attempt}")


def _clean(draft) -> bool:
    """Each string the task put in once is there once (a haystack may hold a drawn number by chance)."""
    text = draft.context
    return all(text.count(s) == 1 for s in draft.once)


def generate(tokenizer: Any, config: RulerConfig, haystack: Haystack | None = None) -> list[RulerSample]:
    """Every sample of ``config``, ordered by length, then task, then index."""
    hay = haystack if haystack is not None else Haystack.load(config.haystack, config.texts)
    out: list[RulerSample] = []
    for length in config.lengths:
        specs = task_specs(length)
        for task in config.tasks:
            spec = specs[task]
            for index in range(config.samples):
                for attempt in range(MAX_ATTEMPTS):
                    build = spec.draw(sample_rng(config.seed, task, length, index, attempt), hay)
                    _, draft, prompt = fit(tokenizer, build, length, spec.min_units, config.tolerance)
                    if _clean(draft):
                        break
                else:
                    raise HaystackError(f"{task} sample {index} at {length} tokens: the haystack holds the drawn "
                                        f"secrets in {MAX_ATTEMPTS} draws; use another haystack text")
                out.append(RulerSample(
                    task=task, length=length, seed=config.seed, index=index, tokens=prompt.tokens,
                    answers=draft.answers, context=draft.context, question=draft.question,
                    answer_prefix=draft.answer_prefix, context_ids=prompt.context_ids,
                    question_ids=prompt.question_ids, max_new_tokens=spec.max_new_tokens,
                    preamble_chars=len(draft.preamble), once=draft.once, counts=dict(draft.counts),
                ))
    return out
