"""From a policy's :class:`~kvpolicy.core.policy.Plan` to the slots a layer keeps: pure tensor
functions, shared by the eager and the compiled decode paths and unit-tested without a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import CacheMisuseError
from .policy import Plan, per_row

if TYPE_CHECKING:
    from .parallel import TensorParallel


def select_slots(
    plan: Plan,
    valid_counts: list[int],
    local: torch.Tensor,
    pos: torch.Tensor,
    seen: list[int],
    shared_positions: bool = False,
    head_valid: list[list[int]] | None = None,
) -> tuple[torch.Tensor, list[int] | list[list[int]]] | None:
    """The slots to keep: ``index`` ``[B, H or 1, K]`` (sorted by position) and each row's count (or each
    row's and head's, see :func:`select_per_head`); None when nothing is evicted.

    ``valid_counts``: valid slots per row; ``local``: row-local positions ``[B, H, L]`` (-1 invalid);
    ``pos``: absolute positions ``[B, H, L]``; ``seen``: real tokens each row has seen. Sinks and the
    recent window are protected (clipped to each row's budget, recent first), invalid slots go
    last, then the plan's scores pick (recency when it has none). Per-row numbers stay on the host
    (``per_row``): a blocking copy to the GPU would stall the queue between compiled steps. When
    every head keeps the same positions (``shared_positions``) and the scores are per layer, the
    selection runs once per row rather than once per head. ``head_valid``: valid slots per row and
    head, where the layer's heads hold different counts (None: every head holds ``valid_counts``).
    """
    if plan.per_head or plan.head_adaptive is not None or head_valid is not None:
        return select_per_head(plan, valid_counts, local, pos, seen, head_valid)
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
    top = best_first(scores, k_max)
    chosen_pos = pos[:, :h].gather(2, top)
    if min(keep) < k_max:  # rows keeping fewer than k_max: their surplus picks sort last, invalid
        rank = torch.arange(k_max, device=local.device).view(1, 1, -1)
        big = torch.iinfo(chosen_pos.dtype).max
        chosen_pos = torch.where(rank < per_row(keep, local.device), chosen_pos, torch.full_like(chosen_pos, big))
    order = chosen_pos.argsort(dim=-1)
    return top.gather(2, order), keep



def select_per_head(
    plan: Plan,
    valid_counts: list[int],
    local: torch.Tensor,
    pos: torch.Tensor,
    seen: list[int],
    head_valid: list[list[int]] | None = None,
) -> tuple[torch.Tensor, list[list[int]]] | None:
    """:func:`select_slots` where KV heads keep different counts: a plan with per-head ``keep``, a
    head-adaptive plan (Ada-KV: one top-k over all of a row's heads), or a layer whose heads already
    hold different counts. Returns ``index`` ``[B, H, K]`` (``K``: the fullest head's count; each head's
    kept slots first, in position order) and the count per row and head. A head-adaptive split is
    known only on the device: its counts are read back (one device read per call)."""
    b, h, length = local.shape
    valid_heads = head_valid if head_valid is not None else [[n] * h for n in valid_counts]
    wanted = plan.keep_per_head(h)
    own = [[max(0, min(int(k), v)) for k, v in zip(ks, vs)] for ks, vs in zip(wanted, valid_heads)]
    held = [sum(vs) for vs in valid_heads]
    adaptive = plan.head_adaptive
    if adaptive is None:
        if all(o >= v for os_, vs in zip(own, valid_heads) for o, v in zip(os_, vs)):
            return None
    else:
        totals = [min(sum(max(0, int(k)) for k in ks), n) for ks, n in zip(wanted, held)]
        if all(t >= n for t, n in zip(totals, held)):
            return None
    row_keep = [max(0, min(int(k) for k in ks)) for ks in wanted]  # protections fit every head's budget
    recent = [min(k, r) for k, r in zip(row_keep, plan.recent if isinstance(plan.recent, list) else [plan.recent] * b)]
    plan_sinks = plan.sinks if isinstance(plan.sinks, list) else [plan.sinks] * b
    sinks = [min(k - r, s) for k, r, s in zip(row_keep, recent, plan_sinks)]
    threshold = [seen[i] - recent[i] for i in range(b)]
    device = local.device
    valid = local >= 0
    scores = local.float() if plan.scores is None else plan.scores.float().expand(b, h, length).clone()
    protected = (local < per_row(sinks, device)) | (local >= per_row(threshold, device))
    scores = scores.masked_fill(protected & valid, float("inf"))
    scores = scores.masked_fill(~valid, float("-inf"))
    rank = torch.arange(length, device=device).view(1, 1, -1)

    def best(counts: list[list[int]]) -> torch.Tensor:
        """``[B, H, L]``: True on each head's ``counts`` best-scored slots."""
        k_max = max(max(c) for c in counts)
        chosen = torch.zeros(b, h, length, dtype=torch.bool, device=device)
        if k_max:
            top = best_first(scores, k_max)
            wanted_t = torch.tensor(counts, device=device).view(b, h, 1)
            chosen.scatter_(2, top, rank[..., :k_max] < wanted_t)
        return chosen

    if adaptive is None:
        chosen, counts = best(own), own
    else:
        if adaptive > 0:  # the safeguard: each head's own best, whatever the other heads score
            floor = [[max(1, int(o * adaptive)) if o > 0 else 0 for o in os_] for os_ in own]
            scores = scores.masked_fill(best(floor), float("inf"))
        flat = scores.reshape(b, h * length)
        t_max = max(totals)
        chosen = torch.zeros(b, h * length, dtype=torch.bool, device=device)
        if t_max:
            top = best_first(flat, t_max)
            ranks = torch.arange(t_max, device=device).view(1, -1)
            chosen.scatter_(1, top, ranks < torch.tensor(totals, device=device).view(b, 1))
        chosen = chosen.view(b, h, length)
        counts = chosen.sum(-1).tolist()  # the split is the scores': read back once
    k = max(max(c) for c in counts)
    key = torch.where(chosen, pos[:, :h], torch.full_like(pos[:, :h], torch.iinfo(pos.dtype).max))
    return key.argsort(dim=-1)[..., :k], counts


def select_per_head_parallel(
    tp: TensorParallel,
    plan: Plan,
    head_valid: list[list[int]],
    local: torch.Tensor,
    pos: torch.Tensor,
    seen: list[int],
    phase: str,
) -> tuple[torch.Tensor, list[list[int]], list[list[int]]] | None:
    """:func:`select_per_head` over the whole layer of a tensor-parallel rank (``tp``): ``plan`` (this rank's
    heads' scores and keep counts), ``head_valid`` (valid slots per row and local head), ``local`` and
    ``pos`` ``[B, local, L]`` are gathered from every rank, the selection runs on them exactly as on one
    process, and this rank keeps its heads: ``index`` ``[B, local, K]`` (``K``: the fullest head's count
    over all ranks, so every rank's buffer is as wide as one process's), this rank's counts and every
    head's counts (the same on every rank); None when no head evicts. Three gathers: the slot layout,
    the host-side counts, the scores (none when they are one row for all heads or recency)."""
    plan, valid = _whole_plan(tp, plan, head_valid, local.device, phase)
    layout = tp.gather_heads(torch.stack([local, pos], dim=-1), phase)  # one gather for both
    selection = select_per_head(plan, [max(row) for row in valid], layout[..., 0], layout[..., 1], seen, valid)
    if selection is None:
        return None
    index, counts = selection
    mine = [row[tp.offset : tp.offset + tp.local] for row in counts]
    return tp.own_heads(index), mine, counts


def _whole_plan(tp: TensorParallel, plan: Plan, head_valid: list[list[int]], device: torch.device,
                phase: str) -> tuple[Plan, list[list[int]]]:
    """``plan`` for every head of the layer (its per-head keep counts and scores gathered), and every
    head's valid count per row."""
    keep = plan.keep_per_head(tp.local)
    if any(len(k) != tp.local for k in keep):  # before the gather: a wrong size would hang the ranks
        raise CacheMisuseError(f"a plan kept counts for {len(keep[0])} KV heads where this rank holds {tp.local} "
                               "under tensor parallelism: give one count per head of view.keys")
    counts = torch.tensor([[[int(k), v] for k, v in zip(ks, vs)] for ks, vs in zip(keep, head_valid)],
                          dtype=torch.long, device=device)  # [B, local, 2]
    gathered = tp.gather_heads(counts, phase).tolist()  # [B][total][2]: one read for both
    scores = plan.scores
    if scores is not None and scores.shape[1] == tp.local:
        scores = tp.gather_heads(scores, phase)
    whole_keep = [[k for k, _ in row] for row in gathered]
    valid = [[v for _, v in row] for row in gathered]
    return Plan(keep=whole_keep, scores=scores, sinks=plan.sinks, recent=plan.recent,
                head_adaptive=plan.head_adaptive), valid


def best_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best scores along the last dimension, best first; among equal scores the earlier
    slot first. ``topk`` leaves the order of ties open, and ties are common (max-pooled votes repeat one value
    over neighbouring slots), so a row's choice could change with the padding in front of it; a stable sort
    makes it depend on the slots' order alone, which left padding does not change."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def in_window(pos: torch.Tensor, pad: torch.Tensor, floor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of a sliding layer that a query can still see once its newest token is at ``floor + window - 2``
    (every later query's window starts at ``floor`` or after): real tokens (not a pad, not empty) at absolute
    position ``floor`` or later. Returns ``order`` ``[B, H, L]``, those slots first in position order (then the
    rest), and their count ``[B, H]`` per row and KV head (on the device: the caller reads it)."""
    live = (pos >= floor) & (pos >= pad.view(-1, 1, 1))
    key = torch.where(live, pos, torch.full_like(pos, torch.iinfo(pos.dtype).max))
    return key.argsort(dim=-1), live.sum(-1)
