"""How the cache sees queries: a pass-through wrapper around transformers' attention functions.

Every decoder family in transformers 5.x computes its final query (after RoPE, after any
q-norm) and then calls ``cache.update(k, v, layer_idx)`` followed by an attention function
looked up by name (``sdpa``, flash, ...) or the modeling file's own ``eager_attention_forward``.
``PolicyCache.update`` leaves a note in a context variable; the wrapper below, when it finds
a note for the calling module's layer, gives the cache the exact query the model used, lets
the cache supply a mask for compressed layers (``PolicyCache.attention_mask``), and tells it
when attention has run (``PolicyCache.attention_done``). With no note (any other cache, or a
policy that asked for nothing) the wrapper is a single ``ContextVar.get`` and a call through.
Inside a compiled decode step the cache arrives as a keyword argument instead
(``compiled_step.FROZEN_CACHE``): a context variable cannot be read in a traced graph. Why this
and not module hooks: docs/architecture.md.
"""

from __future__ import annotations

import contextvars
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import gqa_attention
from .errors import UnsupportedModelError

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

_MARK = "__kvpolicy_wrapped__"


@dataclass
class Pending:
    cache: Any
    layer_idx: int


PENDING: contextvars.ContextVar[Pending | None] = contextvars.ContextVar("kvpolicy_pending", default=None)

#: the keyword argument a compiled decode step carries its frozen cache in (``core/compiled_step.py``)
FROZEN_CACHE = "kvpolicy_frozen_cache"


def _wrap(fn: Callable, impl: str) -> Callable:
    if getattr(fn, _MARK, False):
        return fn

    @functools.wraps(fn)
    def wrapped(module, query, key, value, *args, **kwargs):
        frozen = kwargs.pop(FROZEN_CACHE, None)
        if frozen is not None:  # a compiled decode step over this cache's frozen layers
            return frozen.attend(fn, impl, module, query, key, value, args, kwargs)
        if torch.compiler.is_compiling():
            # someone compiles a model with another (compileable) cache: be invisible, since reading
            # the context variable would break their graph at every layer
            return fn(module, query, key, value, *args, **kwargs)
        note = PENDING.get()
        if note is None or note.layer_idx != getattr(module, "layer_idx", None):
            return fn(module, query, key, value, *args, **kwargs)
        PENDING.set(None)
        cache = note.cache
        if cache.is_frozen():  # a decode step over the frozen layers, run eagerly
            return cache.attend(fn, impl, module, query, key, value, args, kwargs)
        if args:
            mask, rest = args[0], args[1:]
        else:
            mask, rest = kwargs.pop("attention_mask", None), ()
        allowed = cache.attention_mask(note.layer_idx, module, query, mask, impl)
        if allowed is mask:  # slot i holds token i: the model's own mask and function
            out = fn(module, query, key, value, mask, *rest, **kwargs)
        elif query.is_cuda and impl == "sdpa":
            # cuDNN's SDPA builds an execution plan per new shape (~40 ms of CPU on an H100);
            # a compressed layer's length changes every step, so keep to the other kernels.
            with sdpa_kernel(_NO_CUDNN):
                out = attend_masked(fn, impl, module, query, key, value, allowed, mask, rest, kwargs)
        else:
            out = attend_masked(fn, impl, module, query, key, value, allowed, mask, rest, kwargs)
        cache.attention_done(note.layer_idx, module, query)
        return out

    setattr(wrapped, _MARK, True)
    return wrapped


def attend_masked(fn: Callable, impl: str, module, query, key, value, allowed: torch.Tensor, model_mask: Any,
                  rest: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """Attention under kvpolicy's mask ``allowed`` (``[B, H_kv or 1, Q, L]``, True: attend): through
    :func:`gqa_attention.grouped_attention` where SDPA computes what ``fn`` would (each kept key read once),
    else through the model's own function ``fn`` with the mask expanded to its query heads."""
    if gqa_attention.applies(impl, kwargs):
        out = gqa_attention.grouped_attention(
            query, key, value, allowed, kwargs.get("scaling"), kwargs.get("dropout", 0.0)
        )
        return out, None
    want_bool = model_mask.dtype == torch.bool if isinstance(model_mask, torch.Tensor) else impl == "sdpa"
    mask = gqa_attention.per_query_head_mask(allowed, query.shape[1], query.dtype, want_bool)
    return fn(module, query, key, value, mask, *rest, **kwargs)


_installed_modules: set[str] = set()


def install() -> None:
    """Wrap the registered attention functions and every loaded family's eager function.

    Idempotent and cheap; called on each cache's first update so modeling files imported
    after kvpolicy are covered too.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    # the class-wide registry, and the shared instance's local overrides (where another library's
    # ``ALL_ATTENTION_FUNCTIONS[name] = fn`` lands, e.g. kvpress's; they take precedence)
    for mapping in (AttentionInterface._global_mapping, ALL_ATTENTION_FUNCTIONS._local_mapping):
        for name, fn in list(mapping.items()):
            if not _calls_a_wrapper(fn):
                mapping[name] = _wrap(fn, name)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod_name in _installed_modules or not mod_name.startswith("transformers.models."):
            continue
        # read __dict__, not getattr: transformers' lazy package modules import submodules
        # (image processors needing torchvision, ...) on attribute access
        fn = vars(mod).get("eager_attention_forward") if hasattr(mod, "__dict__") else None
        if callable(fn):
            mod.eager_attention_forward = _wrap(fn, "eager")
        _installed_modules.add(mod_name)


def _calls_a_wrapper(fn: Callable, depth: int = 4) -> bool:
    """True if ``fn`` is one of our wrappers or a third-party wrapper around one (found through
    ``__wrapped__`` or the closure, as kvpress's patch wraps whatever was registered when it was
    imported). Wrapping such a function again would run the static decode step's attention, and
    its slot bookkeeping, twice per layer."""
    if getattr(fn, _MARK, False):
        return True
    if depth == 0:
        return False
    inner = [getattr(fn, "__wrapped__", None)]
    inner += [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ()) if _filled(cell)]
    return any(callable(f) and _calls_a_wrapper(f, depth - 1) for f in inner if f is not None)


def _filled(cell) -> bool:
    try:
        _ = cell.cell_contents  # reading an empty cell raises
    except ValueError:  # an empty cell
        return False
    return True


def check_consumed(new_forward: bool = False) -> None:
    """Raise if the previous layer's note was never picked up: its attention bypassed the wrapper. At a
    forward's first layer (``new_forward``) a note is dropped instead: one left by a forward that raised
    (out of memory, interrupted) is not a bypass."""
    if new_forward:
        PENDING.set(None)
        return
    note = PENDING.get()
    if note is not None:
        PENDING.set(None)
        raise UnsupportedModelError(
            f"layer {note.layer_idx} ran attention through a function kvpolicy cannot see (a custom or "
            "unsupported attention implementation, or a modeling file imported after the cache was "
            "filled). Load the model with attn_implementation='sdpa' or 'eager'."
        )
