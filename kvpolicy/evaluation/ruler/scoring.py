"""RULER's scoring: the share of the expected strings found in the model's answer.

Why substring matching: that is RULER's ``string_match_all`` (case-insensitive, per sample, the
answer's control characters turned into newlines first), so scores here read like RULER's. An
answer that repeats the whole context would score 1; generation stops at the model's end of
turn and at the task's token budget, as in RULER.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean(output: str) -> str:
    """RULER's post-processing of an answer: control characters to newlines, stripped."""
    return _CONTROL.sub("\n", output).strip()


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """Share of ``answers`` that occur in ``output`` (case-insensitive), in [0, 1]."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    text = clean(output).lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def binomial_stderr(score: float, samples: int) -> float:
    """``sqrt(p (1 - p) / n)``: the standard error of a share of ``samples`` right-or-wrong answers
    (for tasks with several answers per sample, whose scores are fractions, an upper bound)."""
    if samples < 1:
        return math.nan
    p = min(1.0, max(0.0, score))
    return math.sqrt(p * (1 - p) / samples)


def copy_baseline(body: str, answers: Sequence[str], tokenizer: Any, tokens: int) -> float:
    """The score of an answer that copies the first ``tokens`` tokens of the haystack part: what a
    model gets without finding anything (high for ``cwe``/``fwe`` when the common words are most of
    the list, a needle placed first for the needle tasks). The floor a task's score is read against."""
    ids = tokenizer(body, add_special_tokens=False)["input_ids"][:tokens]
    return string_match_all(tokenizer.decode(ids), answers)
