"""A RULER-style long-context suite, generated offline from a seed, a haystack text and a length.

``generate(tokenizer, RulerConfig(...))`` gives the samples (:mod:`.suite`), the tasks are in
:mod:`.generators`, fitting to a length in the model's tokens in :mod:`.prompt`, the scoring in
:mod:`.scoring`; ``kvpolicy compare --suite ruler`` runs it through :mod:`.task`.
"""

from .config import DEFAULT_TASKS, RulerConfig, ruler_config
from .generators import TASK_NAMES, task_specs
from .haystack import Haystack, HaystackError
from .prompt import LengthError
from .scoring import binomial_stderr, copy_baseline, string_match_all
from .suite import RulerSample, generate

__all__ = [
    "DEFAULT_TASKS", "TASK_NAMES", "Haystack", "HaystackError", "LengthError", "RulerConfig", "RulerSample",
    "binomial_stderr", "copy_baseline", "generate", "ruler_config", "string_match_all", "task_specs",
]
