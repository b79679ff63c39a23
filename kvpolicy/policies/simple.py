"""Policies that need no attention signal: full, StreamingLLM, random."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from ..core.policy import CachePolicy, LayerView, Plan
from .budget import BudgetConfig, BudgetPolicy


class FullPolicy(CachePolicy):
    """Keeps every token: the reference every other policy is compared with."""

    name = "full"
    shared_positions = True

    def plan(self, view: LayerView) -> Plan | None:
        return None


class StreamingLLMConfig(BudgetConfig):
    """Sinks (``sink_size``) plus the newest tokens up to the budget; ``window_size`` is implied."""


class StreamingLLMPolicy(BudgetPolicy):
    """Attention sinks plus the most recent tokens (Xiao et al., 2023); no scores at all."""

    name = "streamingllm"
    config_class = StreamingLLMConfig
    shared_positions = True  # recency is the same for every head

    def scores(self, view: LayerView):
        return None  # recency: the newest tokens win, sinks are protected by the plan


class RandomConfig(BudgetConfig):
    seed: int = Field(0, ge=0)


@dataclass
class RandomLayerState:
    """The random scores drawn so far, a row per row-local position and a column per KV head."""

    table: torch.Tensor | None = None


class RandomPolicy(BudgetPolicy):
    """Keeps a random subset (plus sinks and window) of the same size: the floor to beat."""

    name = "random"
    config_class = RandomConfig

    _CHUNK = 1024

    def new_layer_state(self) -> RandomLayerState:
        return RandomLayerState()

    def scores(self, view: LayerView):
        """Each token draws one random score when it arrives, from a table keyed by its row-local
        position, so a padded row gets the same subset as the same row run alone. The table has a
        column per KV head of the whole layer, of which this process reads its own heads' (under tensor
        parallelism a rank holds some of them), so every rank keeps what one process would."""
        local = view.positions
        heads = view.kv_heads
        table = view.state.table if view.state.table is not None else torch.empty(0, heads)
        need = int(local.max()) + 1
        while table.shape[0] < need:
            chunk = table.shape[0] // self._CHUNK
            gen = torch.Generator().manual_seed(hash((self.config.seed, view.layer_idx, chunk)) & 0x7FFFFFFF)
            table = torch.cat([table, torch.rand(self._CHUNK, heads, generator=gen)])
        view.state.table = table
        table = table.to(local.device)
        head_idx = torch.arange(view.head_offset, view.head_offset + local.shape[1], device=local.device).view(1, -1, 1)
        return table[local.clamp(min=0), head_idx.expand_as(local)]
