"""Expected Attention (Devoto et al., 2025): score each key by the attention that *future* queries are
expected to pay it, estimated from the statistics of the queries seen so far.

Why it suits compress-once-ask-many: the question has not been seen when the context is compressed,
and the last queries of a document say little about it; the distribution of all the document's
queries, moved to the positions where the answer will be generated, says more. See
docs/policies/expected_attention.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..core import rope
from ..core.policy import LayerView, Signals
from .budget import BudgetConfig, BudgetPolicy

_CHUNK = 1024  # queries (statistics) and keys (scores) handled at once


class ExpectedAttentionConfig(BudgetConfig):
    """kvpress's ExpectedAttentionPress defaults: 512 future positions, mean and covariance of the
    queries, scores times the value norm, ``sink_size=4`` leading tokens kept (and left out of the
    statistics), no recent window. ``stats_window`` limits the statistics to the newest prompt queries
    (None: all of them). With ``compress="both"`` a decode-time compression, every ``evict_every``
    tokens, takes its statistics from the ``decode_stats_window`` newest queries."""

    sink_size: int = Field(4, ge=0)
    window_size: int = Field(0, ge=0)
    compress: Literal["prefill", "both"] = "prefill"
    n_future_positions: int = Field(512, ge=1, description="future positions whose queries are averaged")
    use_covariance: bool = Field(True, description="the second-order term of the expected logit")
    use_vnorm: bool = Field(True, description="multiply each score by its value's L2 norm")
    epsilon: float = Field(0.0, ge=0.0, description="added to the expected attention before the value norm")
    stats_window: int | None = Field(None, ge=2, description="newest prompt queries in the statistics (None: all)")
    decode_stats_window: int = Field(64, ge=2, description="newest queries in a decode-time compression's statistics")


class ExpectedAttentionPolicy(BudgetPolicy):
    """Per KV head: the softmax over the kept keys of the expected logit of a future query,
    ``s * mu . k + s^2 / 2 * k^T Sigma k`` (``mu``, ``Sigma``: mean and covariance of the layer's queries
    before RoPE, moved by the RoPE rotation averaged over the next ``n_future_positions`` positions;
    ``s``: the layer's scaling), averaged over the query heads of a group, times ``||v||``."""

    name = "expected_attention"
    config_class = ExpectedAttentionConfig

    @property
    def signals(self) -> Signals:
        c = self.config
        prefill = (lambda n: n) if c.stats_window is None else (lambda n: min(n, c.stats_window))
        return Signals(prefill_query_window=prefill,
                       decode_query_window=c.decode_stats_window if c.compress == "both" else 0)

    def scores(self, view: LayerView) -> torch.Tensor:
        c = self.config
        queries, local = view.recorded_queries()  # [B, Hq, W, D], [B, W]
        if view.phase == "prefill" and c.stats_window is not None:
            queries, local = queries[:, :, -c.stats_window :], local[:, -c.stats_window :]
        mean, cov = query_statistics(view, queries, local, c.sink_size, c.use_covariance)
        mean, cov = moved_to_future(view, mean, cov, c.n_future_positions)
        return expected_attention(view, mean, cov, c.use_vnorm, c.epsilon, c.sink_size)


def query_statistics(view: LayerView, queries: torch.Tensor, local: torch.Tensor, sinks: int,
                     covariance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean ``[B, Hq, D]`` and covariance ``[B, Hq, D, D]`` (float32, biased) of the queries before RoPE,
    over each row's real queries from row-local position ``sinks`` on (the first tokens' queries are
    outliers, kvpress leaves them out too). One pass over chunks of queries, the sums in float64 (so
    ``E[q q^T] - mu mu^T`` loses nothing to cancellation); no copy of all the queries is held."""
    b, hq, w, d = queries.shape
    use = (local >= sinks).double()  # [B, W]
    count = use.sum(-1).clamp(min=1.0).view(b, 1, 1)
    total = torch.zeros(b, hq, d, dtype=torch.float64, device=queries.device)
    second = torch.zeros(b, hq, d, d, dtype=torch.float64, device=queries.device) if covariance else None
    for s in range(0, w, _CHUNK):
        cos, sin = view.rotary(local[:, s : s + _CHUNK].clamp(min=0))  # [B, C, D_rot]
        pre = rope.unrotate(queries[:, :, s : s + _CHUNK].float(), cos.unsqueeze(1), sin.unsqueeze(1)).double()
        weighted = pre * use[:, s : s + _CHUNK].view(b, 1, -1, 1)
        total += weighted.sum(2)
        if second is not None:
            second += weighted.transpose(-1, -2) @ pre
    mean = total / count
    if second is None:
        return mean.float(), None
    cov = second / count.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return mean.float(), cov.float()


def moved_to_future(view: LayerView, mean: torch.Tensor, cov: torch.Tensor | None,
                    future: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The statistics of a query at one of each row's next ``future`` positions (row-local
    ``seen .. seen + future - 1``): RoPE's rotation averaged over those positions, ``R``, maps the mean to
    ``R mu`` and the covariance to ``R Sigma R^T`` (kvpress's approximation: the exact covariance of
    the mixture would add the spread of the rotated means)."""
    b, _, d = mean.shape
    start = torch.tensor(view.seen, device=mean.device).view(-1, 1)
    positions = start + torch.arange(future, device=mean.device).view(1, -1)  # [B, F]
    cos, sin = view.rotary(positions)
    matrix = rope.rotation_matrix(cos.mean(1), sin.mean(1), d).unsqueeze(1)  # [B, 1, D, D]
    mean = (matrix @ mean.unsqueeze(-1)).squeeze(-1)
    if cov is not None:
        cov = matrix @ cov @ matrix.transpose(-1, -2)
    return mean, cov


def expected_attention(view: LayerView, mean: torch.Tensor, cov: torch.Tensor | None, vnorm: bool,
                       epsilon: float, sinks: int) -> torch.Tensor:
    """``[B, H_kv, L]``: the softmax over each row's valid kept keys but its ``sinks`` first tokens (they are
    kept anyway; kvpress leaves them out too, so a head that pours its attention into them still weighs
    as much as the others in its group's mean) of the expected logit, per query head, averaged over the
    query heads of each KV head's group, then ``(score + epsilon) * ||v||``."""
    keys = view.keys
    b, hkv, length, d = keys.shape
    g = mean.shape[1] // hkv
    s = view.scaling
    mean = mean.view(b, hkv, g, 1, d)
    cov = None if cov is None else cov.view(b, hkv, g, d, d)
    parts = []
    for start in range(0, length, _CHUNK):
        k = keys[:, :, start : start + _CHUNK].float().unsqueeze(2)  # [B, H_kv, 1, C, D]
        logits = s * (k * mean).sum(-1)  # [B, H_kv, G, C]
        if cov is not None:
            logits = logits + 0.5 * s * s * ((k @ cov) * k).sum(-1)
        parts.append(logits)
    logits = torch.cat(parts, dim=-1)
    local = view.positions  # [B, H_kv, L]
    logits = logits.masked_fill(~(local >= sinks).unsqueeze(2), float("-inf"))
    scores = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0).mean(dim=2)
    if vnorm:
        scores = (scores + epsilon) * view.values.float().norm(dim=-1)
    return scores
