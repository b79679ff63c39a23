"""Differences between the transformers 5.x releases kvpolicy supports (>= 5.2), in one place.

Why: transformers renamed the cache argument of ``forward`` and ``generate`` from
``past_key_values`` to ``cache`` in 5.24 (the old name still works there, with a
``FutureWarning``, until 6.0) and dropped ``cache_position`` from ``forward`` in 5.17. Passing
the name the installed version expects keeps both old and new releases quiet and working.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any


@cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_argument(model: Any) -> str:
    """The keyword that hands a cache to ``model(...)`` and ``model.generate(...)``:
    ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier 5.x).

    >>> model.generate(**inputs, **{kvpolicy.cache_argument(model): PyramidCache()})  # doctest: +SKIP
    """
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def takes_cache_position(model: Any) -> bool:
    """Whether ``forward`` still takes ``cache_position`` (transformers < 5.17)."""
    return "cache_position" in _forward_parameters(type(model))
