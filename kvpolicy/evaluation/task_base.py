"""What every evaluation task is: its sizes (``EvalSizes`` and the presets), its result, the ``Task``
interface, and the left-padded batch the tasks feed a model. The tasks themselves are in ``tasks.py``
(and the RULER-style suite in ``ruler/task.py``); both build on this module alone.
"""

from __future__ import annotations

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
    #: room for a sentence before the number: on the Python docs SmolLM2 often answers "The secret passkey hidden
    #: in the text above is 68915." (digits are one token each), which 14 tokens cut inside the number
    needle_answer_tokens: int = 24
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


def left_pad(rows: list[list[int]], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
