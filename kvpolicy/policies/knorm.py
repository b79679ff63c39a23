"""KNorm (Devoto et al., 2024): keep the keys with the smallest L2 norm, per KV head."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..core.policy import LayerView, Plan
from .budget import BudgetConfig, BudgetPolicy


class KnormConfig(BudgetConfig):
    """KNorm needs no attention at all. Like kvpress's KnormPress it compresses the prompt only by
    default (``compress="both"`` re-selects while decoding, as the paper's language-modelling runs
    do) and protects no token (``sink_size=0``, ``window_size=0``). ``skip_layers`` are left whole;
    the paper skips layers 0 and 1, where a key's norm predicts its attention worst."""

    sink_size: int = Field(0, ge=0)
    window_size: int = Field(0, ge=0)
    compress: Literal["prefill", "both"] = "prefill"
    skip_layers: tuple[int, ...] = ()


class KnormPolicy(BudgetPolicy):
    """Keys with a low L2 norm draw high attention: each KV head keeps its lowest-norm keys."""

    name = "knorm"
    config_class = KnormConfig

    def scores(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)  # [B, H_kv, L]: the smallest norm scores highest

    def plan(self, view: LayerView) -> Plan | None:
        if view.layer_idx in self.config.skip_layers:
            self.check_target(view)  # a skipped first layer still checks the target once
            return None
        return super().plan(view)

    def decode_growth(self, layer_idx: int, prompt_lens: list[int], new_tokens: int) -> int:
        if layer_idx in self.config.skip_layers:
            return new_tokens
        return super().decode_growth(layer_idx, prompt_lens, new_tokens)
