"""Meeting a ``compression_ratio`` or ``budget`` at every prompt length, and saying so when it cannot be met.

Why this exists: a policy's protections (a recent window, attention sinks, a floor under each layer's
context) are sized for long prompts. On a short one they can add up to more than the target leaves, and
the policy then silently removes less than it was asked to. Here the protections give way to the target,
in a fixed order, and the one case arithmetic cannot fix (every layer must keep a whole number of
tokens, at least one) is reported with a :class:`CompressionTargetWarning` naming what was removed.
"""

from __future__ import annotations

import math
import warnings

#: how far (as a share of the prompt) the removed share may miss the asked one before a warning
TOLERANCE = 0.015


class CompressionTargetWarning(UserWarning):
    """A ``compression_ratio`` or ``budget`` could not be met for a prompt (too short to remove that share
    in whole tokens per layer, or too much of the model is left uncompressed)."""


def asked_share(n: int, compression_ratio: float | None, budget: int | None) -> float:
    """The share of an ``n``-token prompt's KV the target asks to remove (a budget at or above ``n`` asks
    for nothing: there is nothing to remove)."""
    if budget is not None:
        return max(0.0, 1.0 - budget / n)
    return float(compression_ratio or 0.0)


def shrink_protections(window: int, floor: int, n: int, per_layer: float) -> tuple[int, int]:
    """The recent window and context floor a layer keeps so that ``per_layer`` tokens (the target's mean
    over the compressible layers) can hold them: ``(window, floor)`` unchanged while ``window + floor``
    fits, else the floor shrinks first (down to 0), then the window (down to 1, the prompt's last token).
    Each shrinks only as far as the target needs, so a target within reach keeps the settings as given.

    ``floor`` is clipped to the context first (a layer cannot keep more context than there is).
    """
    floor = min(floor, n - window)
    room = math.floor(per_layer + 1e-9)  # whole tokens per layer (the epsilon absorbs float noise)
    if window + floor <= room:
        return window, floor
    if window <= room:
        return window, max(0, room - window)
    return max(1, min(window, room)), 0


def warn_if_missed(policy: str, n: int, asked: float, removed: float, why: str) -> None:
    """Warn (:class:`CompressionTargetWarning`) when ``removed`` is more than :data:`TOLERANCE` from
    ``asked`` for an ``n``-token prompt; ``why`` says what stopped it."""
    if abs(removed - asked) <= TOLERANCE:
        return
    warnings.warn(
        f"{policy}: removed {removed:.1%} of a {n}-token prompt's KV instead of the {asked:.1%} asked: {why}. "
        "Give longer prompts, a lower compression_ratio (or larger budget), or filter this warning "
        "(kvpolicy.policies.targets.CompressionTargetWarning) if that is expected",
        CompressionTargetWarning,
        stacklevel=3,
    )
