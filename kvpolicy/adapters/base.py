"""What differs per model family, in one small object each.

Queries, keys and masks reach the cache generically (see ``core/attention_hook.py``), so an
adapter only states what cannot be inferred safely: which ``model_type`` values it serves,
which layers are sliding-window layers (a compressed layer's mask must apply the window
that transformers' mask would), which layers may be compressed, and which attention
implementations are known to work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
