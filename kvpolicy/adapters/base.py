"""What differs per model family, in one small object each.

Queries, keys and masks reach the cache generically (see ``core/attention_hook.py``), so an
adapter only states what cannot be inferred safely: which ``model_type`` values it serves,
which layers are sliding-window layers (a compressed layer's mask must apply the window
that transformers' mask would), which layers may be compressed, and which attention
implementations are known to work. For PyramidInfer's prune-hidden prefill it also knows the
family's decoder-layer class and how to cut that layer's positional inputs to the kept tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import UnsupportedModelError

SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class ModelAdapter:
    """Per-family facts; subclass and override when a family needs more than these fields."""

    name: str
    model_types: tuple[str, ...]
    attention_implementations: tuple[str, ...] = SUPPORTED_ATTENTION
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: whether prefill_mode="prune_hidden" may run: the decoder layer has the shared 5.x signature
    #: ``forward(hidden_states, attention_mask, position_ids, past_key_values/cache, use_cache,
    #: [cache_position,] position_embeddings, **kwargs)`` handled by :meth:`slice_layer_inputs`
    prune_hidden: bool = True
    #: the decoder-layer class in the family's modeling file (default: ``<X>DecoderLayer`` beside
    #: the attention class ``<X>Attention``)
    decoder_layer: str | None = None

    def check_attention(self, config: Any) -> None:
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in self.attention_implementations:
            raise UnsupportedModelError(
                f"{config.model_type} with attn_implementation={impl!r} is not supported by kvpolicy; "
                f"supported: {', '.join(self.attention_implementations)}. Load the model with "
                "attn_implementation='sdpa'."
            )

    def layer_types(self, config: Any) -> list[str]:
        types = getattr(config, "layer_types", None)
        n = config.num_hidden_layers
        if types:
            return list(types)
        if getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None):
            return ["sliding_attention"] * n
        return ["full_attention"] * n

    def sliding_windows(self, config: Any) -> list[int | None]:
        """Window of each sliding layer (None for full attention); the cache's own mask honours it."""
        window = getattr(config, "sliding_window", None)
        return [window if t == "sliding_attention" else None for t in self.layer_types(config)]

    def compressible_layers(self, config: Any) -> list[bool]:
        """Which layers a policy may compress. All by default: sliding layers are compressed too,
        and the cache's mask for a compressed layer applies the window, so results stay right."""
        return [True] * config.num_hidden_layers

    # ----------------------------------------------------------------- prune-hidden prefill
    def check_prune_hidden(self, config: Any) -> None:
        fix = "use prefill_mode='cache_only' (every layer sees the whole prompt; only the cache is pruned)"
        if not self.prune_hidden:
            raise UnsupportedModelError(
                f"prefill_mode='prune_hidden' is not supported for {config.model_type}: the {self.name} "
                f"adapter does not cut its decoder layers' inputs to the kept tokens; {fix}"
            )
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise UnsupportedModelError(
                f"prefill_mode='prune_hidden' needs attn_implementation 'sdpa' or 'eager' (got {impl!r}): the "
                f"pruned tokens are not contiguous, so the cache builds the mask; load the model with "
                f"attn_implementation='sdpa', or {fix}"
            )

    def decoder_layer_class(self, attention_module: Any) -> type:
        """The decoder-layer class of the family whose attention module is ``attention_module``."""
        attn_cls = type(attention_module)
        name = self.decoder_layer or attn_cls.__name__.replace("Attention", "DecoderLayer")
        cls = vars(sys.modules[attn_cls.__module__]).get(name)
        if not isinstance(cls, type):
            raise UnsupportedModelError(
                f"no decoder-layer class {name!r} beside {attn_cls.__name__} in {attn_cls.__module__}; set "
                "ModelAdapter.decoder_layer for this family, or use prefill_mode='cache_only'"
            )
        return cls

    def layer_index(self, decoder_layer: Any) -> tuple[int | None, Any]:
        """``(layer_idx, config)`` of a decoder layer, read from its attention module."""
        attn = getattr(decoder_layer, "self_attn", None)
        return getattr(attn, "layer_idx", None), getattr(attn, "config", None)

    def slice_layer_inputs(
        self, inputs: dict[str, Any], hidden: torch.Tensor | None, layout: Any
    ) -> dict[str, Any]:
        """Cut one decoder layer's inputs (by parameter name) to the tokens of ``layout``.

        ``hidden`` ``[B, T']``: slots of the incoming hidden states to keep (``None``: they already
        match). The positional inputs arrive full width at every layer, so they are gathered by
        absolute column (``layout.columns``); ``layout.sliced`` does that once per layout.
        """
        from ..core.hidden_pruning import gather_tokens

        cols = layout.columns
        out = dict(inputs)
        if hidden is not None:
            out["hidden_states"] = gather_tokens(inputs["hidden_states"], hidden)
        cos_sin = inputs.get("position_embeddings")
        if cos_sin is not None:
            out["position_embeddings"] = tuple(layout.sliced(t, lambda t: gather_tokens(t, cols)) for t in cos_sin)
        if inputs.get("position_ids") is not None:
            out["position_ids"] = layout.sliced(inputs["position_ids"], lambda t: gather_tokens(t, cols))
        if inputs.get("cache_position") is not None:  # transformers < 5.17; 1-D, shared by rows
            out["cache_position"] = cols[0]
        if "attention_mask" in inputs:
            # not cut: a cut layer's keys sit at their true positions, so the cache replaces the model's mask with
            # its own in that layer's attention (``PolicyCache.attention_mask``, built from the kept positions).
            # Gathering the model's [B, 1, T, T] mask to the kept rows and columns would copy it at every new
            # layout for nothing (a boolean one is 1 GiB per row at 32k tokens)
            out["attention_mask"] = None
        return out
