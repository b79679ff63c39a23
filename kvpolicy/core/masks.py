"""Which kept slots a query may attend to: one pure function for every path (prefill, eager
decode, compiled decode, the oracle tests)."""

from __future__ import annotations

import torch


def allowed(pos: torch.Tensor, pad: torch.Tensor, qpos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean ``[B, H, Q, L]`` (True: attend) for slots holding absolute positions ``pos`` ``[B, H, L]``
    (-1: empty), rows padded on the left by ``pad`` ``[B]``, and queries at absolute positions ``qpos``
    (broadcastable to ``[B, 1, Q, 1]``).

    A slot is attended when it holds a real token (not a pad, not empty), not after the query
    (causal), and, on a sliding layer of ``window`` tokens, not ``window`` or more before it — what
    transformers' own masks allow when slot ``i`` holds token ``i``.
    """
    slot = pos.unsqueeze(2)
    mask = (slot >= pad.view(-1, 1, 1, 1)) & (slot <= qpos)
    if window is not None:
        mask &= slot > qpos - window
    return mask
