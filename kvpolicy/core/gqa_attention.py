"""Attention over a kvpolicy layer that reads each kept key and value once, also on GQA models.

Why: a kvpolicy layer needs its own mask (slots hold arbitrary positions, some invalid), and
transformers' SDPA path, given a mask on CUDA, expands the KV heads to the query heads
(``repeat_kv``) before the kernel: a GQA layer with 4 query heads per KV head then copies its
keys and values four times over on every decode step. Measured alone on an H200 (batch 112,
32 query / 8 KV heads, 3,700 masked slots, bf16; benchmarks/gqa_decode_check.py, run g2): 8.5 ms
expanded, 0.65 ms folded, 0.50 ms through SDPA's ``enable_gqa`` (floor: 0.41 ms).

Here SDPA reads the layer's own buffers: on CUDA through its grouped kernel (``enable_gqa=True``),
elsewhere with the query heads of a group folded into the query length:
``[B, H_q, Q, D]`` becomes ``[B, H_kv, G*Q, D]``, so SDPA sees an ordinary multi-head problem
whose keys and values are the layer's own buffers, and the mask is built per KV head (or once
for all heads) and broadcast over the group without a copy when ``Q == 1``. Query head ``h``
uses KV head ``h // G``, the same grouping as ``repeat_kv``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: attention-function keyword arguments that change the arithmetic beyond a mask and a scale (logit
#: soft-capping, attention sinks, position biases, head masks): with any of them set, the caller falls
#: back to the model's own function (and a frozen layer's step off the decode kernel, ``decode_attention``)
CHANGES_MATH = ("softcap", "s_aux", "sinks", "position_bias", "head_mask")


def applies(impl: str, kwargs: dict[str, Any]) -> bool:
    """True when this route computes what ``impl`` would with ``kwargs`` (the caller's mask applied)."""
    return impl == "sdpa" and all(kwargs.get(name) is None for name in CHANGES_MATH)


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float | None = None,
    dropout: float = 0.0,
    route: str | None = None,
) -> torch.Tensor:
    """SDPA of ``query`` ``[B, H_q, Q, D]`` over ``key``/``value`` ``[B, H_kv, L, D]``, each read once.

    ``allowed``: boolean ``[B, H_kv or 1, Q, L]``, True where a query may attend. ``route``: "enable_gqa"
    (SDPA's own grouped kernel: the faster on an H200, 0.50 against 0.65 ms for one decode call at batch
    112 over 3,700 slots, run g2 in docs/benchmarks/throughput.md) or "fold" (the group folded into the query length:
    any device and torch version); None picks "enable_gqa" on CUDA, else "fold".
    Returns ``[B, Q, H_q, D]``, the layout transformers' attention functions return.
    """
    b, hq, q, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = hq // hkv
    if groups == 1:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).contiguous()
    if (route or ("enable_gqa" if query.is_cuda else "fold")) == "enable_gqa":
        mask = per_query_head_mask(allowed, hq, query.dtype, want_bool=True)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous()
    folded = query.reshape(b, hkv, groups * q, d)
    heads = allowed.shape[1]
    if q == 1:  # [B, H, 1, L] -> [B, H, G, L]: a broadcast view, no copy
        mask = allowed.expand(b, heads, groups, length)
    else:  # query rows are (group, position) pairs: each position's mask row repeated per group member
        mask = allowed.unsqueeze(2).expand(b, heads, groups, q, length).reshape(b, heads, groups * q, length)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(b, hq, q, d).transpose(1, 2).contiguous()


def per_query_head_mask(
    allowed: torch.Tensor, num_query_heads: int, dtype: torch.dtype, want_bool: bool
) -> torch.Tensor:
    """``allowed`` ``[B, H_kv or 1, Q, L]`` in the layout a model's own attention function takes: one
    row per query head (a single head row broadcasts), boolean or additive in ``dtype``."""
    heads = allowed.shape[1]
    if heads > 1 and num_query_heads != heads:
        allowed = allowed.repeat_interleave(num_query_heads // heads, dim=1)
    if want_bool:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)
