"""Shared parts of the budgeted policies: one config, one budget rule, one decode cadence.

Every policy here answers the same two questions — *how many* tokens a layer keeps and
*which* — and only the second differs between H2O, SnapKV, StreamingLLM and random. So
the first lives here once, and each policy is its scoring function.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..core.config import PolicyConfig
from ..core.policy import CachePolicy, LayerView, Plan
from .targets import warn_if_missed


class BudgetConfig(PolicyConfig):
    """How much a layer keeps, and when it is compressed.

    ``compression_ratio`` is the share of the tokens seen that is evicted (0.54 removes about
    54%); ``budget`` instead fixes the tokens kept per layer and head (overrides the ratio).
    ``sink_size`` leading tokens and the ``window_size`` most recent ones are always kept
    (clipped to the budget: the window first, then as many sinks as fit, so the target is met
    at any prompt length; a prompt too short to remove the share in whole tokens warns).
    ``compress`` says when: after the prompt only (``prefill``, the SnapKV way: the cache then
    grows by one token per generated token) or also while decoding (``both``), every
    ``evict_every`` new tokens so the per-token cost stays low.
    """

    compression_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    budget: int | None = Field(None, ge=1)
    sink_size: int = Field(4, ge=0)
    window_size: int = Field(32, ge=0)
    compress: Literal["prefill", "both"] = "both"
    evict_every: int = Field(1, ge=1)


class HeadBudgetConfig(PolicyConfig):
    """Ada-KV's head-adaptive budgets (Feng et al., 2024), for per-KV-head policies whose scores are
    attention probabilities (comparable across heads). ``head_budget="uniform"``: every KV head keeps
    the layer's per-head budget. ``"adaptive"``: the heads of a row share the layer's budget (per-head
    budget times the heads) by one top-k over all their scores, so a head whose attention is
    concentrated on few tokens gives slots to one whose attention is spread; each head keeps at
    least ``head_floor`` of the per-head budget (kvpress's ``alpha_safeguard``). Prompt compression
    only. Each head is stored at its own length (``core/layers/ragged.py``), so the bytes freed equal the
    tokens removed, except inside a compiled decode step (as wide as the fullest head); see docs/policies/adakv.md."""

    head_budget: Literal["uniform", "adaptive"] = "uniform"
    head_floor: float = Field(0.2, ge=0.0, le=1.0)

    @property
    def head_adaptive(self) -> float | None:
        """The plan's ``head_adaptive``: the floor share when adaptive, else None."""
        return self.head_floor if self.head_budget == "adaptive" else None


class BudgetPolicy(CachePolicy):
    """Base of the policies that keep a token budget chosen by a per-slot score."""

    config_class = BudgetConfig

    def target(self, view: LayerView, seen: int) -> int:
        """Tokens to keep in ``view``'s layer for a row that has seen ``seen`` real tokens."""
        return self._budget(seen)

    def _budget(self, seen: int) -> int:
        c = self.config
        if c.budget is not None:
            return c.budget
        return seen - int(seen * c.compression_ratio)

    def decode_growth(self, layer_idx: int, prompt_lens: list[int], new_tokens: int) -> int:
        """Replays the decode cadence: the cache grows one slot a step and drops back to the
        budget every ``evict_every`` steps (an upper bound: the cache may evict sooner)."""
        c = self.config
        if c.compress != "both":
            return new_tokens
        worst = 0
        for n in set(prompt_lens):
            count = start = min(n, self._budget(n))
            peak = count
            for step in range(1, new_tokens + 1):
                count += 1
                peak = max(peak, count)
                if step % c.evict_every == 0:
                    count = min(count, self._budget(n + step))
            worst = max(worst, peak - start)
        return worst

    def due(self, view: LayerView) -> bool:
        """Compress now? Always after the prompt; while decoding per ``compress``/``evict_every``."""
        if view.phase == "prefill":
            return True
        return self.config.compress == "both" and view.since_compress >= self.config.evict_every

    def scores(self, view: LayerView):
        """Score per kept slot, ``[B, H_kv or 1, L]`` (higher kept first); ``None`` keeps the newest."""
        raise NotImplementedError

    def check_target(self, view: LayerView) -> None:
        """At prefill, once per forward (the first compressible layer): warn for each row whose prompt is
        too short for ``compression_ratio`` to be met in whole tokens (:mod:`~kvpolicy.policies.targets`).
        A ``budget`` is always met: a layer keeps ``min(budget, n)``."""
        c = self.config
        if view.phase != "prefill" or c.budget is not None or view.layer_idx != first_compressible(self):
            return
        for n in sorted(set(view.seen)):
            if n > 0:
                kept = min(n, self._budget(n))
                warn_if_missed(self.name, n, c.compression_ratio, 1.0 - kept / n,
                               f"each layer keeps a whole number of tokens ({kept} of {n})")

    def plan(self, view: LayerView) -> Plan | None:
        self.check_target(view)
        if not self.due(view):
            return None
        keep = [self.target(view, s) for s in view.seen]
        if all(k >= s for k, s in zip(keep, view.seen)):
            return None  # under budget: nothing to score, nothing to evict
        return Plan(keep=keep, scores=self.scores(view), sinks=self.config.sink_size, recent=self.config.window_size,
                    head_adaptive=getattr(self.config, "head_adaptive", None))


def first_compressible(policy: CachePolicy) -> int:
    """The first layer the policy may compress (0 before ``setup``): where a once-per-forward check runs."""
    compressible = getattr(policy, "compressible", None) or [True]
    return compressible.index(True) if True in compressible else -1
