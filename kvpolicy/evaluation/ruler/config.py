"""Settings of a RULER-style suite run, validated before any model work (pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...core.errors import ConfigError
from ..texts import CHOICES as TEXTS_CHOICES
from .generators import TASK_NAMES

#: the tasks ``kvpolicy compare --suite ruler`` runs unless told otherwise: those where the embedded
#: SmolLM2-135M's full cache scores well above chance, the four needle tasks; vt, cwe and fwe score at
#: or below their copy baseline at 2k tokens: the model is too small for them (docs/benchmarks/ruler.md)
DEFAULT_TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
#: the smallest target length: below it the fixed parts of the prompts (instructions, question,
#: chat template) leave no room for a haystack
MIN_LENGTH = 64


class RulerConfig(BaseModel):
    """Which tasks, at which lengths (tokens of the model's tokenizer), how many samples each, the
    seed and the haystack: a text file, or (``haystack=None``) the evaluation texts named by ``texts``
    (``kvpolicy.evaluation.texts``: ``austen``, ``python-docs`` or ``auto``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = DEFAULT_TASKS
    lengths: tuple[int, ...] = (4096,)
    samples: int = Field(20, ge=1)
    seed: int = 0
    haystack: str | None = None
    texts: str = "auto"
    #: a prompt must come within this share below its target length (at least 16 tokens below a
    #: short target: see ``prompt.slack``)
    tolerance: float = Field(0.01, gt=0, lt=0.5)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in tasks if t not in TASK_NAMES]
        if unknown or not tasks:
            raise ValueError(f"unknown RULER task {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(TASK_NAMES)}")
        return tuple(dict.fromkeys(tasks))

    @field_validator("texts")
    @classmethod
    def _known_texts(cls, choice: str) -> str:
        if choice not in TEXTS_CHOICES:
            raise ValueError(f"unknown texts {choice!r}; choose from {', '.join(TEXTS_CHOICES)}")
        return choice

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, lengths: tuple[int, ...]) -> tuple[int, ...]:
        if not lengths or any(n < MIN_LENGTH for n in lengths):
            raise ValueError(f"context lengths must be at least {MIN_LENGTH} tokens, got {list(lengths)}")
        return tuple(dict.fromkeys(lengths))


def ruler_config(**settings) -> RulerConfig:
    """:class:`RulerConfig` with a :class:`~kvpolicy.core.config.ConfigError` naming the bad field."""
    try:
        return RulerConfig(**settings)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid RULER suite setting {where}: {first['msg']}") from None
