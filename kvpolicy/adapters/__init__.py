"""Built-in model adapters, registered through the ``kvpolicy.adapters`` entry point."""

from __future__ import annotations

from ..core.registry import hookimpl
from .base import ModelAdapter

LLAMA = ModelAdapter("llama", ("llama",), notes="Llama 1/2/3, SmolLM2 and other Llama-architecture models")
MISTRAL = ModelAdapter(
    "mistral", ("mistral",), notes="with sliding_window set, compressed layers apply the window in their mask"
)
QWEN2 = ModelAdapter("qwen2", ("qwen2",), notes="use_sliding_window=True marks layers sliding per layer_types")
QWEN3 = ModelAdapter("qwen3", ("qwen3",), notes="queries reach the cache after q_norm and RoPE")
PHI3 = ModelAdapter("phi3", ("phi3",), notes="fused qkv projection; nothing special for the cache")
GEMMA = ModelAdapter(
    "gemma",
    ("gemma", "gemma2", "gemma3_text"),
    attention_implementations=("sdpa", "eager"),
    notes="alternating sliding/global layers; softcapping is ignored when scoring",
    prune_hidden=False,  # Gemma 2/3 layers take a mask and RoPE table per layer type; not verified for it
)

BUILTIN_ADAPTERS = [LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA]


@hookimpl
def kvpolicy_adapters() -> list[ModelAdapter]:
    return list(BUILTIN_ADAPTERS)


__all__ = ["ModelAdapter", "BUILTIN_ADAPTERS", "kvpolicy_adapters"]
