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
