"""TOVA (Oren et al., 2024): the current query's attention, averaged over the heads, picks the tokens."""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.policy import LayerView, Signals
from .budget import BudgetConfig, BudgetPolicy


class TOVAConfig(BudgetConfig):
    """TOVA keeps ``budget`` tokens per layer (or ``seen - int(seen * compression_ratio)``) and
    re-selects after every token (``compress="both"``, ``evict_every=1``). The paper protects no
    token: ``sink_size=0``; the newest token is kept (``window_size=1``) as kvpress does, and
    ``window_size=0`` gives the paper's rule exactly."""

    sink_size: int = Field(0, ge=0)
    window_size: int = Field(1, ge=0)


class TOVAPolicy(BudgetPolicy):
    """Token Omission Via Attention: keep the tokens the newest query attends to most, scored by
    its softmax attention averaged over all query heads of the layer; one token set per layer."""

    name = "tova"
    config_class = TOVAConfig
    shared_positions = True  # one score per layer: every KV head keeps the same tokens

    @property
    def signals(self) -> Signals:
        return Signals(
            prefill_query_window=lambda n: min(n, 1),
            decode_query_window=1 if self.config.compress == "both" else 0,
        )

    def scores(self, view: LayerView) -> torch.Tensor:
        # [B, H_kv, L], each KV head's query group already averaged; groups are equal, so the mean
        # over KV heads is the mean over every query head of the layer (across tensor-parallel ranks too)
        return view.mean_over_heads(view.window_attention(num_queries=1))
