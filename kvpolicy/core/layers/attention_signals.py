"""The attention a layer's kept keys receive from given queries: what H2O accumulates and what
window-scored policies (SnapKV, PyramidInfer, ...) rank by.

Costed by memory traffic, since the probabilities are far larger than the queries: the scaling
goes on the few queries, the logits stay in the cache's dtype (masked in place) until the softmax
writes float32, and the sums over the GQA group and the queries are one matrix-vector product
that reads the probabilities once (no NaN clean-up pass: masked slots hold the dtype's lowest
number, and a query that sees nothing weighs 0). Queries go ``_QUERY_CHUNK``
at a time, which bounds the ``[B, H, chunk, L]`` temporary.

The scores are masked exactly as the layer's attention is (``masks.allowed``: real tokens, causal, and
on a sliding layer only the last ``window`` positions): a score must be what the model's attention
can see. Masking them as causal only let a sliding layer's policy rank, and keep, tokens that fell out
of the window, which the model gives no weight and will never attend again.
"""

from __future__ import annotations

import torch

from .. import masks
from ..rows import Rows

_QUERY_CHUNK = 128


def _logits(keys: torch.Tensor, pos: torch.Tensor, rows: Rows, scaling: float, queries: torch.Tensor,
            qpos: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked logits ``[B, H_kv, G, Q, L]`` in the keys' dtype (a slot the query may not see holds the
    dtype's lowest number, not -inf: a query that sees nothing then gets a finite uniform row instead of
    NaNs, one pass over the float32 probabilities fewer) and ``seen`` ``[B, H_kv or 1, 1, Q]``: whether the
    query sees any slot (False: its row must count as zeros)."""
    b, hkv, length, d = keys.shape
    g, q = queries.shape[1] // hkv, queries.shape[2]
    qq = (queries.float() * scaling).to(keys.dtype).reshape(b, hkv, g * q, d)
    logits = torch.matmul(qq, keys.transpose(-1, -2)).view(b, hkv, g, q, length)  # contiguous, for the GEMV
    qpos = qpos.view(-1 if qpos.dim() == 2 else 1, 1, qpos.shape[-1], 1)
    allowed = masks.allowed(pos, rows.pad, qpos, window).unsqueeze(2)  # [B,H,1,Q,L]: the layer's own mask
    logits.masked_fill_(~allowed, torch.finfo(logits.dtype).min)
    return logits, allowed.any(-1)


def attention_probs(keys: torch.Tensor, pos: torch.Tensor, rows: Rows, scaling: float, queries: torch.Tensor,
                    qpos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Softmax attention ``[B, H_kv, G, Q, L]`` (float32; ``G`` query heads per KV head) of ``queries``
    ``[B, H_q, Q, D]`` at absolute positions ``qpos`` (``[Q]`` or per row ``[B, Q]``) over ``keys``
    ``[B, H_kv, L, D]`` held at ``pos`` ``[B, H_kv, L]``; invalid and future slots get none, nor, on a
    sliding layer of ``window`` tokens (None: global), slots outside the window: the scores match the
    model's own attention (``masks.allowed``), not a causal one that sees past the window."""
    logits, seen = _logits(keys, pos, rows, scaling, queries, qpos, window)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return probs.masked_fill_(~seen.unsqueeze(-1), 0.0)  # a pad query attends to nothing


def _weighted_sum(keys: torch.Tensor, pos: torch.Tensor, rows: Rows, scaling: float, queries: torch.Tensor,
                  qpos: torch.Tensor, weights: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[B, H_kv, L]``: the probabilities summed over the GQA group and the queries, query ``i`` of row ``b``
    weighted by ``weights[b, i]``, as one matrix-vector product that reads them once (a query that sees
    nothing weighs 0)."""
    logits, seen = _logits(keys, pos, rows, scaling, queries, qpos, window)
    b, hkv, g, q, length = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).view(b, hkv, g * q, length)
    w = (weights.view(b, 1, 1, q) * seen).expand(b, hkv, g, q).reshape(b, hkv, 1, g * q)
    return torch.matmul(w, probs).squeeze(2)


def accumulate_into(acc: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, rows: Rows, scaling: float,
                    queries: torch.Tensor, qpos: torch.Tensor, window: int | None = None) -> None:
    """Add to ``acc`` ``[B, H_kv, L]`` the attention each slot receives from ``queries`` (summed over the
    queries, the GQA group averaged), within the layer's sliding ``window`` (None: global): the unweighted
    :func:`window_attention`."""
    acc += window_attention(keys, pos, rows, scaling, queries, qpos, None, window)


def window_attention(keys: torch.Tensor, pos: torch.Tensor, rows: Rows, scaling: float, queries: torch.Tensor,
                     qpos: torch.Tensor, weights: torch.Tensor | None = None,
                     window: int | None = None) -> torch.Tensor:
    """``[B, H_kv, L]``: the attention of the ``W`` recorded ``queries`` over the slots, each query weighted
    by ``weights`` (``[W]`` or ``[B, W]``, oldest first; default 1), the GQA group's heads averaged; within
    the layer's sliding ``window`` (None: global)."""
    w = queries.shape[2]
    if weights is None:
        weights = torch.ones(w, device=queries.device)
    weights = weights[..., -w:].to(device=queries.device, dtype=torch.float32)
    if weights.dim() == 1:
        weights = weights.expand(queries.shape[0], w)
    out = None
    for s in range(0, w, _QUERY_CHUNK):
        part = _weighted_sum(keys, pos, rows, scaling, queries[:, :, s : s + _QUERY_CHUNK],
                             qpos[..., s : s + _QUERY_CHUNK], weights[:, s : s + _QUERY_CHUNK], window)
        out = part if out is None else out + part
    return out / (queries.shape[1] // keys.shape[1])
