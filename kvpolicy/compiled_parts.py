"""A long prefill's memory-bound glue, compiled: the parts of a forward that never see the cache.

At 8k-token prompts a prefill forward is mostly matrix products and attention, but about a
quarter of its device time (H200, Llama-3-8B shape, docs/benchmarks/throughput.md) went to
elementwise kernels that eager PyTorch runs one operation at a time: RMSNorm's upcast, power,
mean and scale; SwiGLU's activation and product; RoPE's ``rotate_half`` (a slice, a negation and a
concatenation) and its two products. Each pass reads and writes the whole activation. Fusing
them is what a compiler does well, but the whole forward cannot be compiled while a kvpolicy
cache runs policy code (and allocates data-dependent shapes) inside it.

So :func:`compiled_parts` compiles only what is cache-free: every direct child module of each
decoder layer except its attention module (the MLP and the norms), the final norm, and the
family's ``apply_rotary_pos_emb`` (looked up by name in the attention module's modeling file,
where the attention code finds it at call time). The cache's ``update``, the policy and the
attention kernel stay eager. Everything is restored when the block ends, so decoding (and any
other model in the process) runs as before.

The compiled parts compute what the eager ones compute, up to floating-point rounding: a fused
kernel rounds once where eager rounds after every operation (equal within 1e-5 in float32,
tested; in bfloat16 within its rounding).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

from .core.errors import UnsupportedModelError

ROTARY_FUNCTION = "apply_rotary_pos_emb"

#: (id of the original function or module forward, frozen options) -> its compiled version, so a
#: second prefill of the same model does not compile again
_COMPILED: dict[tuple[int, tuple], Any] = {}


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a causal LM (``model.model.layers`` in every supported family)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `model.layers`: compiled prefill parts need a decoder-only "
            "transformers model (Llama, Mistral, Qwen, Phi-3, Gemma). Call prefill(..., compile=False)."
        )
    return list(layers)


def _attention_child(layer: Any) -> str | None:
    for name in ("self_attn", "attention", "attn"):
        if hasattr(layer, name):
            return name
    return None


def _compiled(fn: Any, options: dict[str, Any]) -> Any:
    key = (id(fn), tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **options)
    return _COMPILED[key]


@contextlib.contextmanager
def compiled_parts(model: Any, options: dict[str, Any] | None = None) -> Iterator[int]:
    """Within the block, ``model``'s cache-free parts run compiled; yields how many were replaced.

    ``options``: ``torch.compile`` keyword arguments (default ``{"dynamic": False}``: a prefill
    chunk's shape repeats, and a fixed shape gives the fastest kernels)."""
    options = {"dynamic": False} if options is None else dict(options)
    layers = decoder_layers(model)
    replaced: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)
    try:
        rotary_modules = set()
        for layer in layers:
            attention = _attention_child(layer)
            if attention is None:
                raise UnsupportedModelError(
                    f"decoder layer {type(layer).__name__} has no attention child (self_attn): "
                    "call prefill(..., compile=False)"
                )
            rotary_modules.add(type(getattr(layer, attention)).__module__)
            for name, child in layer.named_children():
                # an instance-level forward is someone's hook (accelerate's device placement): left alone
                if name != attention and "forward" not in vars(child):
                    replaced.append((child, "forward", child.forward))
                    child.forward = _compiled(type(child).forward, options).__get__(child)
        norm = getattr(getattr(model, "model", model), "norm", None)
        if isinstance(norm, torch.nn.Module) and "forward" not in vars(norm):
            replaced.append((norm, "forward", norm.forward))
            norm.forward = _compiled(type(norm).forward, options).__get__(norm)
        for module_name in rotary_modules:
            module = sys.modules.get(module_name)
            fn = getattr(module, ROTARY_FUNCTION, None) if module is not None else None
            if callable(fn):
                replaced.append((module, ROTARY_FUNCTION, fn))
                setattr(module, ROTARY_FUNCTION, _compiled(fn, options))
        yield len(replaced)
    finally:
        for owner, attribute, original in reversed(replaced):
            if attribute == "forward":
                del owner.forward  # the instance attribute goes: the class's forward shows through again
            else:
                setattr(owner, attribute, original)
