"""Policies that score tokens by attention: H2O, SnapKV, PyramidKV."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..core.policy import LayerView, Signals
from .budget import BudgetConfig, BudgetPolicy, HeadBudgetConfig
from .schedule import linear_budgets


class H2OConfig(BudgetConfig):
    """H2O's budget: ``window_size`` recent tokens plus heavy hitters up to the budget."""


class H2OPolicy(BudgetPolicy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the keys with the most attention received
    so far (summed over every query, per KV head) plus a recent window, evicting as decoding goes."""

    name = "h2o"
    config_class = H2OConfig

    @property
    def signals(self) -> Signals:
        return Signals(accumulated_attention=True)

    def scores(self, view: LayerView) -> torch.Tensor:
        return view.accumulated_attention()


class SnapKVConfig(BudgetConfig, HeadBudgetConfig):
    """SnapKV votes with the last ``window_size`` prompt queries; ``kernel_size`` pools the votes
    so that neighbours of an important token survive with it. ``head_budget="adaptive"``: Ada-KV's
    split of the layer's budget across KV heads (:class:`~kvpolicy.policies.budget.HeadBudgetConfig`)."""

    compress: str = Field("prefill", pattern="^(prefill|both)$")
    kernel_size: int = Field(7, ge=1)

    @model_validator(mode="after")
    def _adaptive_prompt_only(self):
        if self.head_budget == "adaptive" and self.compress != "prefill":
            raise ValueError(
                "head_budget='adaptive' splits the prompt's budget across KV heads; it is not applied while "
                "decoding (a head could outgrow the buffers sized for the compiled decode step): set "
                "compress='prefill' or head_budget='uniform'"
            )
        return self


class SnapKVPolicy(BudgetPolicy):
    """SnapKV (Li et al., 2024): observation-window attention, max-pooled, per KV head."""

    name = "snapkv"
    config_class = SnapKVConfig

    @property
    def signals(self) -> Signals:
        w = self.config.window_size
        return Signals(
            prefill_query_window=lambda n: min(n, w), decode_query_window=w if self.config.compress == "both" else 0
        )

    def scores(self, view: LayerView) -> torch.Tensor:
        votes = view.window_attention(num_queries=self.config.window_size)
        return max_pool(votes, self.config.kernel_size)


class PyramidKVConfig(SnapKVConfig):
    """PyramidKV spends the same total budget as SnapKV but more in low layers: the bottom layer
    gets ``2*avg - top`` and the top ``avg / beta`` (never below ``window_size + sink_size``, unless
    the mean budget ``avg`` itself is smaller: that floor then shrinks to ``avg``, every layer keeps
    ``avg`` and the ratio is still met). It compresses the prompt only; generated tokens are all kept."""

    compress: str = Field("prefill", pattern="^prefill$")
    beta: float = Field(20.0, ge=1.0)


class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV (Cai et al., 2024): SnapKV scoring with pyramidal per-layer budgets."""

    name = "pyramidkv"
    config_class = PyramidKVConfig

    def target(self, view: LayerView, seen: int) -> int:
        avg = super().target(view, seen)
        # the protections' floor gives way to the target: a floor above the mean would keep more than asked
        floor = min(seen, self.config.window_size + self.config.sink_size, avg)
        budgets = linear_budgets(avg * view.num_layers, view.num_layers, self.config.beta, floor)
        return spread_surplus(budgets, seen)[view.layer_idx]


def spread_surplus(budgets: list[int], cap: int) -> list[int]:
    """Clip budgets at ``cap`` (a layer cannot keep more than it saw) and give what the clipped
    layers could not use to the others, so the total — the ratio the user asked for — holds."""
    out = [min(b, cap) for b in budgets]
    surplus = sum(budgets) - sum(out)
    while surplus > 0:
        open_layers = [i for i, b in enumerate(out) if b < cap]
        if not open_layers:
            break
        share = max(surplus // len(open_layers), 1)
        for i in open_layers:
            add = min(share, cap - out[i], surplus)
            out[i] += add
            surplus -= add
            if surplus == 0:
                break
    return out


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool ``[B, H, L]`` scores along L so a token's neighbours share its importance:
    a multi-token fact (a number split into digits) survives whole rather than in fragments."""
    if kernel <= 1:
        return scores
    b, h, length = scores.shape
    pooled = F.max_pool1d(scores.reshape(b * h, 1, length), kernel, stride=1, padding=kernel // 2)
    return pooled[..., :length].reshape(b, h, length)
