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


def pyramid_profile(
    num_layers: int, final_ratio: float, strategy: DecayStrategy, downsample_interval: int = 1
) -> list[float]:
    """The pyramid's shape: each layer's share of the context, 1.0 at layer 0, non-increasing.

    The ratios compound exactly as in :func:`pyramid_context_lengths` (layer ``l + 1`` gets
    ``p_l * r_l`` when ``l % downsample_interval == 0``, else ``p_l``), without its rounding and
    without its floor: :func:`scaled_context_lengths` applies a floor of its own.
    """
    profile = [1.0]
    p = 1.0
    for layer in range(num_layers - 1):
        if layer % downsample_interval == 0:
            p *= decay_ratio(layer, num_layers, final_ratio, strategy)
        profile.append(p)
    return profile


def scaled_context_lengths(context_length: int, profile: list[float], scale: float, floor: int) -> list[int]:
    """Context tokens per layer of the pyramid ``profile`` scaled by ``scale``:
    ``int(scale * context_length * p_l)`` clipped to ``[min(floor, context_length), context_length]``.

    Every count is non-decreasing in ``scale`` (what makes :func:`solve_context_scale`'s bisection
    valid) and, like ``profile``, non-increasing with depth. Unclipped layers keep the profile's
    proportions to within rounding: the shape is scaled, not changed.
    """
    low = min(floor, context_length)
    return [min(context_length, max(low, int(scale * context_length * p))) for p in profile]


def solve_context_scale(
    context_length: int, profile: list[float], floor: int, target: float, iterations: int = 100
) -> float:
    """The scale whose :func:`scaled_context_lengths` sum is nearest ``target`` context tokens.

    The sum is a non-decreasing step function of the scale (steps of a few tokens at most), so
    a bisection finds it; it runs over ``log(scale)`` because a steep profile's deep layers
    need scales of ``1 / p_l``, far above 1. A target outside what the floor (every layer at
    ``min(floor, context_length)``) and the full context (every layer at ``context_length``)
    allow is clipped to the nearer end: the scale returned then gives that end.
    """
    if context_length <= 0 or max(profile, default=0.0) <= 0.0:
        return 0.0  # no context, or no layer with a share of it: every scale gives the floor

    def total(scale: float) -> int:
        return sum(scaled_context_lengths(context_length, profile, scale, floor))

    smallest = min((p for p in profile if p > 0.0), default=1.0)
    lo = 0.5 / (context_length * max(profile))  # every int(...) is 0: each layer at its floor
    hi = 2.0 / smallest  # every layer with p > 0 at the whole context
    total_lo, total_hi = total(lo), total(hi)
    if target <= total_lo:
        return lo
    if target >= total_hi:
        return hi
    log_lo, log_hi = math.log(lo), math.log(hi)  # invariant: total(lo) < target <= total(hi)
    for _ in range(iterations):
        mid = (log_lo + log_hi) / 2
        got = total(math.exp(mid))
        if got < target:
            log_lo, total_lo = mid, got
        else:
            log_hi, total_hi = mid, got
            if got == target:
                break
        if log_hi - log_lo < 1e-12:  # the scales left differ by less than any count can tell
            break
    return math.exp(log_lo) if target - total_lo < total_hi - target else math.exp(log_hi)
