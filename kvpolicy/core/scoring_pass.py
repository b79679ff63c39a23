"""A scoring pass after the prompt's forward: the seam KVzip needs.

KVzip scores the prompt's KV pairs by running the model again, over the prompt's cache, on a
reconstruction of the prompt (``CachePolicy.needs_scoring_pass``). The cache meets the model only
inside attention, where neither the model object nor the prompt's token ids are in reach, and
the prompt's forward must have finished before the second one starts. The one place that has
both, right after the prompt's forward, is the model call itself. So ``PreTrainedModel.__call__``
is wrapped (once per process, when the first cache whose policy needs a pass is made, as
``compiled_step`` wraps ``get_compiled_call``): when the call's cache is a fresh ``PolicyCache``
whose policy needs a pass, the prompt's forward runs as usual (the policy defers its plans), then
``PolicyCache.run_scoring_pass`` runs the policy's chunks through the model's base model and
compresses. Every other call (another cache, no cache, a decode step, the base model called by
the outer model, anything being compiled) costs a dictionary lookup and goes straight through.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_MARK = "__kvpolicy_scoring_pass__"


def _cache_of(kwargs: dict[str, Any]) -> Any:
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def install() -> None:
    """Wrap ``PreTrainedModel.__call__`` (idempotent)."""
    from transformers import PreTrainedModel

    current = PreTrainedModel.__dict__.get("__call__")
    if current is not None and getattr(current, _MARK, False):
        return
    original = current if current is not None else torch.nn.Module.__call__

    @functools.wraps(original)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return original(self, *args, **kwargs)
        cache = _cache_of(kwargs)
        begin = getattr(cache, "begin_scoring_pass", None)
        if begin is None or not begin():
            return original(self, *args, **kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        out = original(self, *args, **kwargs)
        cache.run_scoring_pass(self, input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        return out

    setattr(__call__, _MARK, True)
    PreTrainedModel.__call__ = __call__
