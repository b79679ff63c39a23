"""The rotary position embedding (RoPE) a layer's queries and keys carry, for policies that move a
query to another position: Expected Attention predicts the queries of positions not yet seen.

Why here and not in a policy: the cache never sees the model's rotary module (it is called by the
decoder model, outside attention), and RoPE differs per family (scaling types, partial rotary
dimensions for Phi, a local base for Gemma 3's sliding layers). So the family's own
``<X>RotaryEmbedding`` class, which sits in the modeling file beside the attention class, is built
once from the attention module's config and asked for cos/sin: whatever RoPE variant the model
uses, the policy gets the same numbers the model applied.

Only relative rotations matter to a policy (a key at position ``j`` and a query at ``t`` interact
through ``t - j``), so the positions given here need only share one frame with the positions the
policy compares them with; left-padded rows may use row-local positions.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any

import torch

from .errors import UnsupportedModelError

#: attention module -> (its family's rotary embedding, the layer type to ask it for, or None)
_BUILT: weakref.WeakKeyDictionary[Any, tuple[torch.nn.Module, str | None]] = weakref.WeakKeyDictionary()


def _rotary_module(attention: Any) -> tuple[torch.nn.Module, str | None]:
    hit = _BUILT.get(attention)
    if hit is not None:
        return hit
    module = sys.modules[type(attention).__module__]
    prefix = type(attention).__name__.replace("Attention", "")
    candidates = [v for k, v in vars(module).items() if isinstance(v, type) and k.endswith("RotaryEmbedding")]
    named = [c for c in candidates if c.__name__ == f"{prefix}RotaryEmbedding"]
    if not (named or len(candidates) == 1):
        raise UnsupportedModelError(
            f"cannot find the rotary embedding of {type(attention).__name__} in {module.__name__} (looked for "
            f"{prefix}RotaryEmbedding); a policy that moves queries to other positions (expected_attention) needs "
            "it: use a RoPE model of a supported family (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3)"
        )
    config = attention.config
    rotary = (named or candidates)[0](config=config)
    layer_type = None
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma 3: a base per layer type
        layer_type = getattr(attention, "layer_type", None) or config.layer_types[attention.layer_idx]
    rotary.eval()
    _BUILT[attention] = (rotary, layer_type)
    return rotary, layer_type


@torch.no_grad()
def cos_sin(attention: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos``, ``sin`` ``[B, P, D_rot]`` of the attention module's RoPE at ``positions``
    ``[B, P]`` (``D_rot``: the rotated dimensions, the first ``D_rot`` of each head; the rest pass
    through). Attention scaling factors of scaled RoPE types are included, as the model applies them."""
    rotary, layer_type = _rotary_module(attention)
    rotary.to(positions.device)
    probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    cos, sin = rotary(probe, positions.long(), **kwargs)
    return cos.float(), sin.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` rotated as the model rotates queries and keys (``x * cos + rotate_half(x) * sin`` on the
    first ``cos.shape[-1]`` dimensions); ``cos``/``sin`` broadcast against ``x[..., :D_rot]``."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate` (also for scaled RoPE, whose ``cos² + sin²`` is not 1)."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    norm = cos * cos + sin * sin
    return torch.cat(((rot * cos - rotate_half(rot) * sin) / norm, rest), dim=-1)


def rotation_matrix(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[..., D, D]``: the matrix ``M`` with ``M @ x == rotate(x, cos, sin)`` for a head of ``head_dim``
    (``cos``/``sin`` ``[..., D_rot]``). Also for averaged cos/sin, which are no rotation any more."""
    d = cos.shape[-1]
    half = torch.zeros(head_dim, head_dim, dtype=cos.dtype, device=cos.device)  # rotate_half as a matrix
    idx = torch.arange(d // 2, device=cos.device)
    half[idx, idx + d // 2] = -1.0
    half[idx + d // 2, idx] = 1.0
    ones = torch.ones(*cos.shape[:-1], head_dim - d, dtype=cos.dtype, device=cos.device)
    zeros = torch.zeros_like(ones)
    c = torch.cat((cos, ones), dim=-1)
    s = torch.cat((sin, zeros), dim=-1)
    return torch.diag_embed(c) + s.unsqueeze(-1) * half
