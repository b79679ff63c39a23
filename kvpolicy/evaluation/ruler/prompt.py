"""From a :class:`~.generators.Draft` to token ids, and fitting a draft to a length in tokens.

Why the context and the question are tokenized apart: ``kvpolicy compare --question
after-context`` compresses the context alone and then feeds the question through the same
cache, while ``in-prompt`` compresses both in one forward. Tokenizing the two parts apart, once,
gives both modes the very same tokens, so the modes differ only in what the policy saw.

The prompt is the model's chat template (one user turn: context then question) with RULER's
answer prefix opening the assistant's turn, as RULER's templates end in the prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...core.errors import KVPolicyError
from .generators import Draft

_MARK = "<<kvpolicy-ruler-question>>"


@dataclass(frozen=True)
class Prompt:
    context_ids: list[int]
    question_ids: list[int]

    @property
    def tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer: Any, draft: Draft) -> Prompt:
    """The draft as a one-turn chat: context ids (system prompt, turn header, instructions, body) and
    question ids (the question, the end of the turn, the assistant header and the answer prefix)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": draft.context + _MARK + draft.question}],
            add_generation_prompt=True, tokenize=False,
        )
        head, _, tail = text.partition(_MARK)
        return Prompt(_ids(tokenizer, head), _ids(tokenizer, tail + draft.answer_prefix))
    head = (tokenizer.bos_token or "") + draft.context
    return Prompt(_ids(tokenizer, head), _ids(tokenizer, draft.question + "\n" + draft.answer_prefix))


class LengthError(KVPolicyError, ValueError):
    """A target length the task cannot be fitted to; the message names the smallest possible (a
    :class:`~kvpolicy.core.errors.KVPolicyError`, so ``kvpolicy compare`` prints it as one line)."""


#: the slack allowed below a short target, in tokens: one step of a word-list task (a list entry,
#: a made-up word) can be 5-8 tokens, more than 1% of a target under about 1,600 tokens
MIN_SLACK_TOKENS = 16


def slack(target: int, tolerance: float) -> int:
    """How far below ``target`` a fitted prompt may end: ``tolerance`` of it, at least
    :data:`MIN_SLACK_TOKENS`."""
    return max(MIN_SLACK_TOKENS, int(target * tolerance))


def fit(
    tokenizer: Any, build: Callable[[int], Draft], target: int, min_units: int = 0, tolerance: float = 0.01,
) -> tuple[int, Draft, Prompt]:
    """The largest size ``n`` whose prompt has at most ``target`` tokens, and its draft and prompt.

    Tokens grow about linearly with ``n``, so a secant step lands close and bisection finishes
    (typically 3-5 tokenizations of the whole prompt). The search stops once the prompt is within
    half of ``tolerance`` below the target; a prompt that cannot come within :func:`slack` of it
    raises :class:`LengthError` (e.g. the fixed part is longer than the target).
    """

    def measure(n: int) -> tuple[int, Draft, Prompt]:
        draft = build(n)
        prompt = render(tokenizer, draft)
        return prompt.tokens, draft, prompt

    lo = min_units
    c_lo, d_lo, p_lo = measure(lo)
    if c_lo > target:
        raise LengthError(f"the task's fixed part alone is {c_lo} tokens, more than the target {target}; "
                          f"use a context length of at least {c_lo + slack(c_lo, tolerance)}")
    close = max(0, int(target * tolerance / 2))
    hi = None
    slope = None
    n_probe = lo + 64
    for _ in range(60):
        if target - c_lo <= close or (hi is not None and hi - lo <= 1):
            break
        if slope is None:
            n = n_probe
        else:
            n = lo + max(1, int((target - c_lo) / slope))
            if hi is not None and not lo < n < hi:
                n = (lo + hi) // 2
        c, d, p = measure(n)
        if hi is None or n != hi:
            slope = max(1e-3, (c - c_lo) / (n - lo))
        if c <= target:
            lo, c_lo, d_lo, p_lo = n, c, d, p
        else:
            hi = n
    if c_lo < target - slack(target, tolerance):
        raise LengthError(f"could not fit the prompt to {target} tokens (closest below: {c_lo}); "
                          "the haystack text may be too short or too irregular")
    return lo, d_lo, p_lo
