"""From a policy's :class:`~kvpolicy.core.policy.Plan` to the slots a layer keeps: pure tensor
functions, shared by the eager and the compiled decode paths and unit-tested without a model."""

from __future__ import annotations

import torch

from .policy import Plan, per_row


def select_slots(
    plan: Plan,
    valid_counts: list[int],
    local: torch.Tensor,
    pos: torch.Tensor,
    seen: list[int],
    shared_positions: bool = False,
) -> tuple[torch.Tensor, list[int]] | None:
    """The slots to keep: ``index`` ``[B, H or 1, K]`` (sorted by position) and each row's count;
    None when nothing is evicted.

    ``valid_counts``: valid slots per row; ``local``: row-local positions ``[B, H, L]`` (-1 invalid);
    ``pos``: absolute positions ``[B, H, L]``; ``seen``: real tokens each row has seen. Sinks and the
    recent window are protected (clipped to each row's budget, recent first), invalid slots go
    last, then the plan's scores pick (recency when it has none). Per-row numbers stay on the host
    (``per_row``): a blocking copy to the GPU would stall the queue between compiled steps. When
    every head keeps the same positions (``shared_positions``) and the scores are per layer, the
    selection runs once per row rather than once per head.
    """
    keep = [max(0, min(int(k), n)) for k, n in zip(plan.keep, valid_counts)]
    if all(k >= n for k, n in zip(keep, valid_counts)):
        return None  # nothing to evict (masked pads stay masked)
    if shared_positions and (plan.scores is None or plan.scores.shape[1] == 1):
        local = local[:, :1]
    b, h, length = local.shape
    valid = local >= 0
    scores = local.float() if plan.scores is None else plan.scores.float().expand(b, h, length).clone()
    rows = range(b)
    recent = [min(k, r) for k, r in zip(keep, plan.recent if isinstance(plan.recent, list) else [plan.recent] * b)]
    plan_sinks = plan.sinks if isinstance(plan.sinks, list) else [plan.sinks] * b
    sinks = [min(k - r, s) for k, r, s in zip(keep, recent, plan_sinks)]
    threshold = [seen[i] - recent[i] for i in rows]
    protected = (local < per_row(sinks, local.device)) | (local >= per_row(threshold, local.device))
    scores = scores.masked_fill(protected, float("inf"))
    scores = scores.masked_fill(~valid, float("-inf"))
    k_max = max(keep) if keep else 0
    top = scores.topk(k_max, dim=-1, sorted=True).indices  # best first
    chosen_pos = pos[:, :h].gather(2, top)
    if min(keep) < k_max:  # rows keeping fewer than k_max: their surplus picks sort last, invalid
        rank = torch.arange(k_max, device=local.device).view(1, 1, -1)
        big = torch.iinfo(chosen_pos.dtype).max
        chosen_pos = torch.where(rank < per_row(keep, local.device), chosen_pos, torch.full_like(chosen_pos, big))
    order = chosen_pos.argsort(dim=-1)
    return top.gather(2, order), keep

