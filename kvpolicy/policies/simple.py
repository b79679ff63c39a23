"""Policies that need no attention signal: full, StreamingLLM, random."""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.policy import CachePolicy, LayerView, Plan
from .budget import BudgetConfig, BudgetPolicy


class FullPolicy(CachePolicy):
    """Keeps every token: the reference every other policy is compared with."""

    name = "full"

    def plan(self, view: LayerView) -> Plan | None:
        return None


class StreamingLLMPolicy(BudgetPolicy):
    """Attention sinks plus the most recent tokens (Xiao et al., 2023); no scores at all."""

    name = "streamingllm"

    def scores(self, view: LayerView):
        return None  # recency: the newest tokens win, sinks are protected by the plan


class RandomConfig(BudgetConfig):
    seed: int = Field(0, ge=0)


class RandomPolicy(BudgetPolicy):
    """Keeps a random subset (plus sinks and window) of the same size: the floor to beat."""

    name = "random"
    config_class = RandomConfig

    def scores(self, view: LayerView):
        gen = view.state.get("generator")
        if gen is None:
            gen = torch.Generator().manual_seed(self.config.seed * 1009 + view.layer_idx)
            view.state["generator"] = gen
        b, h, length = view.positions.shape
        return torch.rand(b, h, length, generator=gen).to(view.positions.device)
