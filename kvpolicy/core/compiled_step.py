"""The seam between ``generate``'s compiled decode step and a kvpolicy cache.

transformers compiles the decode forward itself when the cache says ``is_compileable``
(``GenerationMixin._valid_auto_compile_criteria``) and calls it through
``PreTrainedModel.get_compiled_call``. A compressed cache must do host-side work between two
such steps (count the token, run the policy's plan, gather the kept slots), and that work must
stay out of the graph: it reads Python numbers and its shapes change. So the compiled call is
wrapped: before it, the cache brings its frozen layers up to date (eagerly); the compiled
graph itself then only reads tensors of fixed shape and address. The cache goes into the
call as one more keyword argument (``FROZEN_CACHE``), which transformers passes down, as it
passes every extra keyword, to each layer's attention function: there the attention wrapper
(``core/attention_hook.py``) finds the frozen layers it runs over, with no state outside the
call (a compiled step takes what it reads as arguments). Any other cache, or a forward that
is not a one-token decode step, goes straight to the compiled call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .attention_hook import FROZEN_CACHE

_MARK = "__kvpolicy_compiled_step__"


class CompiledStep:
    """A compiled forward, with the kvpolicy cache in its arguments (if any) stepped around it."""

    def __init__(self, compiled: Callable):
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        enter = getattr(cache, "enter_compiled_step", None)
        if enter is None or not enter(_new_tokens(args, kwargs)):
            return self.compiled(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs, **{FROZEN_CACHE: cache})
        finally:
            cache.exit_compiled_step()


def _new_tokens(args: tuple, kwargs: dict) -> int:
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None and args:
        tokens = args[0]
    return int(tokens.shape[1]) if tokens is not None and tokens.dim() >= 2 else -1


def install() -> None:
    """Wrap ``PreTrainedModel.get_compiled_call`` (once; idempotent). Must run before ``generate``
    picks its decode function, which happens before the prompt's forward: the cache's constructor
    calls it."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.get_compiled_call
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_compiled_call(self, compile_config=None):
        return CompiledStep(original(self, compile_config))

    setattr(get_compiled_call, _MARK, True)
    PreTrainedModel.get_compiled_call = get_compiled_call
