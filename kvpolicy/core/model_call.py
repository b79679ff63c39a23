"""The model call, seen by the cache: the one place that has the model, the prompt's inputs and the
cache together, before the prompt's forward and after it.

Two mechanisms need it, neither named after a policy: a forward in row chunks (``prefill_rows``:
the prompt of a large batch runs some rows at a time, each chunk into its own cache, which the
cache then adopts, so the peak holds one chunk's activations; ``generate`` sees one forward), and
one extra forward after the prompt's (``scoring_pass.py``). So ``PreTrainedModel.__call__`` is
wrapped, once per process, when the first cache that needs either is made (as ``compiled_step``
wraps ``get_compiled_call``). Every other call (another cache, no cache, a decode step, the base
model called by the outer model, anything being compiled) costs a dictionary lookup and goes
straight through.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError

_MARK = "__kvpolicy_model_call__"

#: the keyword inputs of a model call that hold one entry per batch row (split into row chunks)
ROW_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")


def cache_of(kwargs: dict[str, Any]) -> Any:
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
        cache = cache_of(kwargs)
        if getattr(cache, "begin_scoring_pass", None) is None:
            return original(self, *args, **kwargs)
        return run(cache, original, self, args, kwargs)

    setattr(__call__, _MARK, True)
    PreTrainedModel.__call__ = __call__


def run(cache: Any, original: Callable, model: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """One model call over a kvpolicy ``cache``: in row chunks when the cache asks for them and is fresh,
    followed by the policy's scoring pass when it needs one, else as it is."""
    if args:  # generate passes keywords; a positional input_ids is named here
        kwargs = {"input_ids": args[0], **kwargs}
        args = args[1:]
    rows = cache.prefill_rows
    if rows and not cache.layers and not args and _batch(kwargs) > rows:
        return forward_in_row_chunks(model, cache, rows, kwargs)
    if not cache.begin_scoring_pass():
        return original(model, *args, **kwargs)
    out = original(model, *args, **kwargs)
    cache.run_scoring_pass(model, kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("position_ids"))
    return out


def _batch(kwargs: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name].shape[0]
    return 0


def forward_in_row_chunks(model: Any, cache: Any, rows: int, kwargs: dict[str, Any]) -> Any:
    """``model(**kwargs)`` over the empty ``cache``, ``rows`` rows at a time: each chunk into an empty copy of
    ``cache`` (a model call of its own, so a scoring pass runs per chunk), then ``cache`` adopts the chunks.
    Returns the first chunk's output holding every row's logits, and ``cache``."""
    batch = _batch(kwargs)
    other = [k for k, v in kwargs.items() if k not in ROW_INPUTS and isinstance(v, torch.Tensor) and v.dim()
             and v.shape[0] == batch and batch > 1]
    if other or kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        raise ConfigError(
            f"prefill_rows runs the prompt {rows} rows at a time, which splits {', '.join(ROW_INPUTS)} only"
            f"{' (this call also has ' + ', '.join(other) + ')' if other else ''} and returns logits only (no "
            "hidden states or attentions); make the cache without prefill_rows for this call"
        )
    key = "cache" if "cache" in kwargs else "past_key_values"
    first, logits, chunks = None, [], []
    for start in range(0, batch, rows):
        part = {k: v[start : start + rows] if k in ROW_INPUTS and isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}
        part[key] = target = cache.empty_copy(compiled_decode=False, prefill_rows=None)
        out = model(**part)
        logits.append(out.logits)
        chunks.append(target)
        if first is None:
            first = out
        del out
    cache.adopt(chunks)
    first.logits = torch.cat(logits)
    if getattr(first, "past_key_values", None) is not None:
        first.past_key_values = cache
    return first
