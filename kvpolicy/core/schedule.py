"""Per-layer retention schedules.

A pyramid is just a schedule: a function from layer index to a keep ratio. Keeping the
maths here (and pure Python) lets policies share it and lets property tests check it
without a model.
"""

from __future__ import annotations

import math
from typing import Literal

DecayStrategy = Literal["cosine", "linear", "constant"]


def decay_ratio(layer_idx: int, num_layers: int, final_ratio: float, strategy: DecayStrategy) -> float:
    """Keep ratio of ``layer_idx``: 1.0 at the first layer, falling to ``final_ratio`` at the last.

    Cosine follows PyramidInfer's reference code, ``(1 - r) * (cos(pi * l / L) + 1) / 2 + r``.
    Linear is the straight line between the same end points. (The reference code's ``linear``
    branch falls through to a constant ratio by an ``if``/``else`` slip; we implement the
    evident intent and document the difference in docs/policies/pyramidinfer.md.)
    """
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx {layer_idx} outside 0..{num_layers - 1}")
    if strategy == "constant":
        return final_ratio
    frac = layer_idx / num_layers
    if strategy == "cosine":
        return (1.0 - final_ratio) * (math.cos(math.pi * frac) + 1.0) / 2.0 + final_ratio
    if strategy == "linear":
        return 1.0 - (1.0 - final_ratio) * frac
    raise ValueError(f"unknown decay strategy {strategy!r}; use cosine, linear or constant")


def pyramid_context_lengths(
    context_length: int,
    num_layers: int,
    final_ratio: float,
    strategy: DecayStrategy,
    min_context_length: int,
    downsample_interval: int = 1,
) -> list[int]:
    """Context tokens (outside the recent window) each layer holds, PyramidInfer style.

    The reference prunes hidden states *after* layer ``l`` with ratio ``r_l`` applied to the
    context that layer ``l`` saw, so the lengths compound: layer 0 holds everything and each
    later layer holds ``int(prev * r_{l-1})`` as long as that stays above
    ``min_context_length`` (else it keeps ``prev``). The result is non-increasing.
    """
    lengths = [context_length]
    current = context_length
    for layer in range(num_layers - 1):
        ratio = decay_ratio(layer, num_layers, final_ratio, strategy)
        if layer % downsample_interval == 0 and current > min_context_length and ratio < 1.0:
            candidate = int(current * ratio)
            if candidate > min_context_length:
                current = candidate
        lengths.append(current)
    return lengths


def linear_budgets(total_budget: int, num_layers: int, beta: float, floor: int) -> list[int]:
    """PyramidKV-style arithmetic budgets: more tokens low, fewer high, same mean.

    The bottom layer gets ``2*avg - top`` and the top ``avg / beta``; ``floor`` bounds it below.
    """
    if num_layers == 1:
        return [total_budget]
    avg = total_budget / num_layers
    top = max(avg / beta, float(floor))
    bottom = 2 * avg - top
    out = []
    for layer in range(num_layers):
        value = bottom - (bottom - top) * layer / (num_layers - 1)
        out.append(max(int(round(value)), floor))
    return out
