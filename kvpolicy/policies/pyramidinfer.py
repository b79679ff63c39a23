"""PyramidInfer (Yang et al., ACL 2024): pivotal context chosen by recent attention, fewer per layer.

See docs/policies/pyramidinfer.md for the algorithm, every setting, and where this differs
from the reference code (github.com/mutonix/pyramidinfer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..core.config import load_preset
from ..core.policy import CachePolicy, LayerView, Plan, Signals, per_row
from ..core.rows import PerRow
from .attention_scored import max_pool
from .budget import HeadBudgetConfig
from .schedule import (
    DecayStrategy,
    decay_ratio,
    pyramid_context_lengths,
    pyramid_profile,
    scaled_context_lengths,
    solve_context_scale,
)
from .targets import asked_share, shrink_protections, warn_if_missed


@dataclass
class PyramidLayerState:
    """One layer's decode bookkeeping, set at prefill: per row, the row-local position where the next
    decode group starts (``frontier``) and decoding's recent window (``gen_window``, fixed by the prompt's
    length); ``next_due_step``: no row's group fills before this step (plans before it return at once)."""

    frontier: PerRow = field(default_factory=PerRow)
    gen_window: PerRow = field(default_factory=PerRow)
    next_due_step: int = 0


class PyramidInferConfig(HeadBudgetConfig):
    """Settings named as in the reference code's ``configs/*.json`` (defaults: its Llama-2-7B).
    ``head_budget="adaptive"`` (with ``head_aggregation="kv_head"``): Ada-KV's split of each layer's
    prefill budget across KV heads (:class:`~kvpolicy.policies.budget.HeadBudgetConfig`)."""

    # prefill: which prompt tokens each layer keeps
    prefill_recent_ratio: float = Field(0.2, gt=0.0, lt=1.0, description="share of the prompt whose queries vote")
    prefill_decay_ratio: float = Field(0.9, gt=0.0, le=1.0, description="keep ratio reached at the last layer")
    prefill_decay_strategy: DecayStrategy = "cosine"
    min_context_length: int = Field(64, ge=0, description="a layer never prunes its context below this")
    min_context_ratio: float = Field(
        0.0, ge=0.0, le=1.0,
        description="ours: the same floor as a share of the prompt's context (the larger floor wins); "
        "0: off, as the reference",
    )
    layerwise_downsample_interval: int = Field(1, ge=1, description="prune after every n-th layer")
    distance_weight: float = Field(1.2, ge=0.0, description="weight of the newest voting query (oldest: 1)")
    streamingllm_sink_len: int = Field(4, ge=0, description="leading tokens always kept")
    # decoding: how generated tokens are compressed
    gen_recent_ratio: float = Field(
        0.2, gt=0.0, lt=1.0, description="recent window while decoding, share of the prompt"
    )
    gen_decay_ratio: float = Field(0.1, gt=0.0, le=1.0)
    gen_decay_strategy: DecayStrategy = "cosine"
    exceed_length_to_compress: int = Field(16, ge=1, description="tokens leaving the window per re-compression")
    gen_compress_ratio: float = Field(0.9, gt=0.0, le=1.0)
    gen_query_window: int = Field(32, ge=1, description="recent queries that score decode-time groups")
    # ours (defaults keep the reference behaviour)
    pool_kernel: int = Field(
        1, ge=1, description="max-pool the votes over neighbouring tokens (SnapKV-style); 1: off, as the reference"
    )
    head_aggregation: Literal["layer", "kv_head"] = Field(
        "layer", description="'layer': one token set per layer (reference); 'kv_head': per KV head"
    )
    prefill_mode: Literal["cache_only", "prune_hidden"] = Field(
        "cache_only",
        description="'cache_only': every layer sees the whole prompt, only the cache is pruned (exact prompt "
        "forward); 'prune_hidden': tokens a layer drops at prefill are not computed by deeper layers (reference)",
    )
    prune_hidden_start: float = Field(
        0.0, ge=0.0, le=1.0,
        description="ours, with prefill_mode='prune_hidden': the hidden states leaving layer l are cut to its kept "
        "tokens only from l = int(share * num_layers) on; the layers up to that one compute the whole prompt and "
        "choose their caches from it, as cache_only does (0: every layer cuts, as the reference)",
    )
    # ours: a target for the prompt's KV instead of hand-tuned budgets (None: the schedule above as is)
    compression_ratio: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="ours: share of the prompt's KV removed at prefill, summed over all layers; the pyramid's "
        "shape is kept and scaled to meet it at each prompt length, the floor and then the kept recent window "
        "shrinking where they do not fit (None: off)",
    )
    budget: int | None = Field(
        None, ge=1,
        description="ours: mean prompt tokens kept per layer at prefill (the same scaling as compression_ratio; "
        "None: off)",
    )

    @model_validator(mode="after")
    def _one_target(self):
        if self.compression_ratio is not None and self.budget is not None:
            raise ValueError(
                f"compression_ratio ({self.compression_ratio}) and budget ({self.budget}) are two ways to set the "
                "same target; give one: compression_ratio (share of the prompt's KV removed over all layers) or "
                "budget (mean prompt tokens kept per layer)"
            )
        return self

    @model_validator(mode="after")
    def _adaptive_needs_kv_heads(self):
        if self.head_budget == "adaptive" and self.head_aggregation != "kv_head":
            raise ValueError(
                "head_budget='adaptive' splits a layer's budget across its KV heads, which needs a selection per "
                "head: set head_aggregation='kv_head' (or head_budget='uniform')"
            )
        return self

    @model_validator(mode="after")
    def _one_token_set_per_layer(self):
        if self.prefill_mode == "prune_hidden" and self.head_aggregation != "layer":
            raise ValueError(
                "prefill_mode='prune_hidden' needs head_aggregation='layer' (the hidden states entering the "
                "next layer are per token, so all KV heads of a layer must keep the same tokens); set "
                "head_aggregation='layer' or prefill_mode='cache_only'"
            )
        return self


#: the settings that set a target for the prompt's KV: given alone, ``PyramidCache`` takes the shape of
#: ``RATIO_PRESET`` and scales it to the target
TARGET_FIELDS = frozenset({"compression_ratio", "budget"})

#: The shape of the ratio form (``PyramidCache(compression_ratio=r)``, ``make_cache("pyramidinfer", budget=b)``
#: with no other setting): the reference presets' 20% voting window and early-layer pruning lose retrieval
#: once scaled to half the prompt, so the ratio form takes the preset chosen on the RULER-style suite and the
#: needle task (docs/benchmarks/ratio_form.md); ``PyramidCache()`` with no target keeps the reference preset
#: for its depth.
RATIO_PRESET = "pyramidinfer_ratio"

#: prompt lengths whose per-layer counts a policy remembers (the oldest are forgotten first)
MEMO_LENGTHS = 4096

#: Reference presets by model depth, for ``PyramidCache()`` with no arguments (the same values
#: as configs/pyramidinfer_*.yaml; a test keeps them equal).
DEPTH_PRESETS: list[tuple[int, str, dict]] = [
    (32, "pyramidinfer_llama2_7b", {}),
    (40, "pyramidinfer_llama2_13b", {"prefill_decay_ratio": 0.8, "layerwise_downsample_interval": 2}),
    (10**9, "pyramidinfer_llama2_70b", {"prefill_decay_ratio": 0.9, "layerwise_downsample_interval": 3}),
]


@functools.cache
def ratio_preset() -> tuple[str, PyramidInferConfig]:
    """The ratio form's shape (:data:`RATIO_PRESET`), read from its file once per process: every cache that
    meets a model with a target alone asks for it."""
    values = {k: v for k, v in load_preset(RATIO_PRESET).items() if k != "policy"}
    return RATIO_PRESET, PyramidInferConfig(**values)


def preset_for_depth(num_layers: int) -> tuple[str, PyramidInferConfig]:
    """Deeper models get the reference's settings for the Llama-2 of the nearest depth at or above."""
    for max_layers, name, values in DEPTH_PRESETS:
        if num_layers <= max_layers:
            return name, PyramidInferConfig(**values)
    raise AssertionError("unreachable")  # pragma: no cover


class PyramidInferPolicy(CachePolicy):
    name = "pyramidinfer"
    config_class = PyramidInferConfig

    def __init__(self, config=None, **overrides):
        # no shape settings given (a target alone is not one): the shape is picked at setup, by depth, or
        # RATIO_PRESET's where a target is given (the ratio form); the settings may come as keywords or as a
        # settings dict (the registry's and ``compare``'s way); a config object is taken as it is
        given = set(overrides) | (set(config) - {"policy"} if isinstance(config, dict) else set())
        self.auto = (config is None or isinstance(config, dict)) and given <= TARGET_FIELDS
        super().__init__(config, **overrides)
        self.preset_name: str | None = None
        #: prompt length -> share of the prompt's KV the solved schedule removes (target mode only;
        #: below the target where the target is out of reach at that length, see prefill_keep)
        self.solved: dict[int, float] = {}
        self._keep_memo: dict[int, list[int]] = {}
        #: prompt length -> the recent window its layers keep (the voting window, or less where a target
        #: needs the room; filled beside ``_keep_memo``)
        self._window_memo: dict[int, int] = {}
        self._memo_config: PyramidInferConfig | None = None

    def setup(self, num_layers: int, compressible: list[bool]) -> None:
        super().setup(num_layers, compressible)
        if self.auto:
            self.preset_name, preset = ratio_preset() if self.has_target else preset_for_depth(num_layers)
            targets = {k: getattr(self.config, k) for k in TARGET_FIELDS}
            self.config = PyramidInferConfig(**{**preset.model_dump(), **targets})
        self._memo_config = None  # depth or layers changed: per-length counts are recomputed

    @property
    def prunes_hidden_states(self) -> bool:
        return self.config.prefill_mode == "prune_hidden"

    def cuts_hidden_after(self, layer_idx: int) -> bool:
        """Prune-hidden from layer ``int(prune_hidden_start * num_layers)`` on (see the setting)."""
        return self.prunes_hidden_states and layer_idx >= int(self.config.prune_hidden_start * self.num_layers)

    def recent_window(self, prompt_len: int, ratio: float) -> int:
        return min(prompt_len, 1 + int(prompt_len * ratio))

    def kept_window(self, prompt_len: int) -> int:
        """Newest prompt tokens every compressible layer keeps: the voting window
        (``prefill_recent_ratio``), or fewer where a target leaves no room for it (:meth:`prefill_keep`).
        The voters stay the whole voting window either way."""
        self.prefill_keep(prompt_len)
        return self._window_memo[prompt_len]

    @property
    def signals(self) -> Signals:
        c = self.config
        return Signals(
            prefill_query_window=lambda n: self.recent_window(n, c.prefill_recent_ratio),
            decode_query_window=c.gen_query_window,
        )

    def context_floor(self, context_length: int) -> int:
        c = self.config
        return max(c.min_context_length, int(c.min_context_ratio * context_length))

    def context_budgets(self, context_length: int) -> list[int]:
        """The reference schedule: context tokens per layer (no target; see :meth:`prefill_keep`)."""
        c = self.config
        return pyramid_context_lengths(
            context_length,
            self.num_layers,
            c.prefill_decay_ratio,
            c.prefill_decay_strategy,
            self.context_floor(context_length),
            c.layerwise_downsample_interval,
        )

    @property
    def has_target(self) -> bool:
        return self.config.compression_ratio is not None or self.config.budget is not None

    def prefill_keep(self, prompt_len: int) -> list[int]:
        """Prompt tokens each layer keeps after the prefill of a ``prompt_len``-token prompt, by layer
        index (a layer the policy may not compress keeps them all).

        Without a target: ``context_budgets(n - w)[l] + w``, the reference schedule. With
        ``compression_ratio`` or ``budget``: ``C_l + w`` with ``C_l`` the pyramid's shape
        (:func:`pyramid_profile`) scaled by the one factor that removes the target share of the
        prompt over all layers (:func:`solve_context_scale`), the floor clipping each layer. Where
        the recent window and the floor keep more than the target allows, they shrink first
        (:func:`~kvpolicy.policies.targets.shrink_protections`: the floor, then the kept window, down
        to one token); a target still out of reach (every layer keeps at least one token, layers not
        compressible keep all) warns and ``solved[prompt_len]`` records the share actually removed.

        Computed once per distinct prompt length (``plan`` asks once per layer and row).
        """
        if self._memo_config is not self.config:  # settings or depth changed since the last call
            self._keep_memo, self._window_memo, self.solved, self._memo_config = {}, {}, {}, self.config
        keep = self._keep_memo.get(prompt_len)
        if keep is None:
            keep = self._keep_memo[prompt_len] = self._solve_keep(prompt_len)
            if len(self._keep_memo) > MEMO_LENGTHS:
                oldest = next(iter(self._keep_memo))
                del self._keep_memo[oldest]
                self._window_memo.pop(oldest, None)
                self.solved.pop(oldest, None)
        return keep

    def _solve_keep(self, n: int) -> list[int]:
        c = self.config
        layers = self.num_layers
        w = self.recent_window(n, c.prefill_recent_ratio)
        self._window_memo[n] = w
        if n == 0:  # an all-padding row: nothing to keep, nothing to solve
            return [0] * layers
        context = n - w
        if not self.has_target:
            return [b + w for b in self.context_budgets(context)]
        kept_total = min(c.budget, n) * layers if c.budget is not None else (1.0 - c.compression_ratio) * layers * n
        on = [layer for layer in range(layers) if self.compressible[layer]]
        if not on:
            return [n] * layers
        profile = pyramid_profile(layers, c.prefill_decay_ratio, c.prefill_decay_strategy,
                                  c.layerwise_downsample_interval)
        # the mean each compressible layer may keep once the other layers (which keep everything) are counted;
        # the floor, then the kept window, give way where they would not fit in it
        per_layer = (kept_total - (layers - len(on)) * n) / len(on)
        w, floor = shrink_protections(w, self.context_floor(context), n, per_layer)
        self._window_memo[n] = w
        context = n - w
        # what the target leaves for the compressible layers' context once their recent windows are counted
        target = kept_total - len(on) * w - (layers - len(on)) * n
        scale = solve_context_scale(context, [profile[layer] for layer in on], floor, target)
        lengths = scaled_context_lengths(context, profile, scale, floor)
        keep = [lengths[layer] + w if self.compressible[layer] else n for layer in range(layers)]
        self.solved[n] = 1.0 - sum(keep) / (layers * n)
        why = ("every compressible layer keeps at least one token" if len(on) == layers
               else f"{layers - len(on)} of {layers} layers are not compressible and keep the whole prompt, "
               "the others at least one token")
        warn_if_missed(self.name, n, asked_share(n, c.compression_ratio, c.budget), self.solved[n], why)
        return keep

    def group_keep(self, layer_idx: int) -> int:
        """Tokens kept of each decode-time group of ``exceed_length_to_compress``."""
        c = self.config
        ratio = decay_ratio(layer_idx, self.num_layers, c.gen_decay_ratio, c.gen_decay_strategy)
        return max(int(c.exceed_length_to_compress * c.gen_compress_ratio * ratio), 1)

    @property
    def shared_positions(self) -> bool:  # type: ignore[override]
        return self.config.head_aggregation == "layer"

    def decode_growth(self, layer_idx: int, prompt_lens: list[int], new_tokens: int) -> int:
        """Replays the decode schedule of :meth:`_plan_decode`: one slot per step, and each due
        group of ``exceed_length_to_compress`` shrinks to ``group_keep(layer_idx)``."""
        c = self.config
        group = c.exceed_length_to_compress
        evict = group - self.group_keep(layer_idx)
        worst = 0
        for n in set(prompt_lens):
            window = self.recent_window(n, c.gen_recent_ratio)
            frontier = n - self.kept_window(n)
            count = peak = 0
            for step in range(1, new_tokens + 1):
                count += 1
                peak = max(peak, count)
                if n + step - window - frontier >= group:
                    frontier += group
                    count -= evict
            worst = max(worst, peak)
        return worst

    def _aggregate(self, view: LayerView, scores: torch.Tensor) -> torch.Tensor:
        if self.config.head_aggregation == "layer":
            return view.mean_over_heads(scores)  # across tensor-parallel ranks too
        return scores

    def new_layer_state(self) -> PyramidLayerState:
        return PyramidLayerState()

    def plan(self, view: LayerView) -> Plan | None:
        if view.phase == "prefill":
            return self._plan_prefill(view)
        return self._plan_decode(view)

    def _plan_prefill(self, view: LayerView) -> Plan | None:
        c = self.config
        voters = [self.recent_window(n, c.prefill_recent_ratio) for n in view.seen]
        windows = [self.kept_window(n) for n in view.seen]  # the voters, or fewer under a tight target
        view.state.frontier = PerRow(n - w for n, w in zip(view.seen, windows))
        # decoding's recent window per row depends on the prompt alone: computed once here, not at
        # every decode step of every layer (a per-row Python loop in the static path's hot loop)
        view.state.gen_window = PerRow(self.recent_window(n, c.gen_recent_ratio) for n in view.prompt_len)
        self._note_next_due(view)
        keep = [self.prefill_keep(n)[view.layer_idx] for n in view.seen]
        if all(k >= n for k, n in zip(keep, view.seen)):
            return None
        w_max = max(voters)
        weights = distance_weights(voters, c.distance_weight, view.device)
        votes = view.window_attention(weights=weights, num_queries=w_max)
        scores = self._aggregate(view, max_pool(votes, c.pool_kernel))
        return Plan(keep=keep, scores=scores, sinks=c.streamingllm_sink_len, recent=windows,
                    head_adaptive=c.head_adaptive)

    def _plan_decode(self, view: LayerView) -> Plan | None:
        c = self.config
        group = c.exceed_length_to_compress
        if view.step < view.state.next_due_step:
            return None  # no row can be due yet: skip the per-row check (it runs for every layer, every step)
        frontier: list[int] = view.state.frontier
        due = [s - w - f >= group for s, w, f in zip(view.seen, view.state.gen_window, frontier)]
        if not any(due):
            self._note_next_due(view)
            return None
        local = view.positions  # [B, H, L], -1 invalid
        if self.shared_positions:  # every head holds the same positions: select once per row
            local = local[:, :1]
        valid = view.valid_counts
        # a row not due gets an empty group (start past every position)
        start = [f if d else 1 << 40 for f, d in zip(frontier, due)]
        start_t = per_row(start, local.device)
        in_group = (local >= start_t) & (local < start_t + group)
        attn = self._aggregate(view, max_pool(view.window_attention(), c.pool_kernel)).expand_as(local)
        scores = torch.where(in_group, attn, torch.full_like(attn, float("inf")))
        # a group keeps group_keep of its tokens; where the cache already freed some (they left a sliding window),
        # fewer are evicted: an eviction count beyond the group's tokens would take live ones outside it
        evict = [max(0, group - self.group_keep(view.layer_idx) - min(group, max(0, g - f)))
                 for f, g in zip(frontier, view.freed_below)]
        # heads holding their own counts (head-adaptive since the prefill; or a sliding window freed more of one
        # head's tokens than another's) each evict alike
        heads = view.valid_counts_per_head if c.head_budget == "adaptive" else view.layer.valid_counts_per_head()
        if heads is not None:
            keep = [[v - e if d else v for v in row] for row, d, e in zip(heads, due, evict)]
        else:
            keep = [v - e if d else v for v, d, e in zip(valid, due, evict)]
        view.state.frontier = PerRow(f + group if d else f for f, d in zip(frontier, due))
        self._note_next_due(view)
        return Plan(keep=keep, scores=scores, sinks=0, recent=0)

    def _note_next_due(self, view: LayerView) -> None:
        """The step (``view.step``) at which the first row's next decode group fills: plans before it
        return at once. Rows moving (beam search) can only make the true first step later, so the note
        stays a safe lower bound."""
        group = self.config.exceed_length_to_compress
        state = view.state
        wait = min(w + f + group - s for s, w, f in zip(view.seen, state.gen_window, state.frontier))
        state.next_due_step = view.step + max(wait, 0)


def distance_weights(windows: list[int], newest: float, device: torch.device) -> torch.Tensor:
    """``[B, max(windows)]`` vote weights: row ``b``'s last ``windows[b]`` queries rise linearly from 1
    (oldest) to ``newest``, earlier columns are 0. Built on ``device`` from host integers only."""
    w_max = max(windows)
    col = torch.arange(w_max, device=device, dtype=torch.float32).view(1, -1)
    w = per_row(windows, device)  # an int when every row agrees
    if isinstance(w, torch.Tensor):
        w = w.view(-1, 1).float()
        span = (w - 1).clamp(min=1)
    else:
        span = max(w - 1, 1)
    first = w_max - w
    weights = 1.0 + (col - first) * ((newest - 1.0) / span)
    return torch.where(col >= first, weights, 0.0).expand(len(windows), w_max)
