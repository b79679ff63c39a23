"""The ``CachePolicy`` interface: what a compression policy decides, and what it may look at.

A policy never touches tensors it does not own. The cache hands it a :class:`LayerView`
(the layer's kept keys and positions, lengths, and lazy access to the signals it declared),
and the policy answers with a :class:`Plan`: how many tokens each row keeps and a score per
kept slot. The cache does the rest (protecting sinks and the recent window, top-k, gathering,
freeing memory), so every policy gets those invariants for free and is a few dozen lines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from .config import PolicyConfig

if TYPE_CHECKING:  # pragma: no cover
    from .layers import KVLayer
    from .parallel import TensorParallel

Phase = Literal["prefill", "decode"]


def per_row(values: int | list[int], device: torch.device) -> int | torch.Tensor:
    """Per-row integers broadcastable against ``[B, H, L]``: a plain int when every row agrees.

    A ``torch.tensor(list, device=cuda)`` is a blocking copy that drains the GPU queue; in the
    common case (equal rows) none is needed, and otherwise the copy goes through pinned memory.
    """
    if isinstance(values, int):
        return values
    if len(set(values)) == 1:
        return values[0]
    host = torch.tensor(values, dtype=torch.long).view(-1, 1, 1)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True)
class Signals:
    """What a policy needs the framework to compute; anything not asked for costs nothing.

    ``prefill_query_window(prompt_len)`` — how many of the last prompt queries to keep for
    scoring at prefill (0: none). ``decode_query_window`` — how many recent queries to keep
    during decoding for later re-scoring. ``accumulated_attention`` — H2O-style running sum of
    the attention every query has paid to every kept key.
    """

    prefill_query_window: Callable[[int], int] = lambda n: 0
    decode_query_window: int = 0
    accumulated_attention: bool = False

    @property
    def needs_queries(self) -> bool:
        return self.decode_query_window > 0 or self.accumulated_attention or self.prefill_query_window(1 << 20) > 0


NO_SIGNALS = Signals()


@dataclass
class Plan:
    """A policy's answer for one layer.

    ``keep``: tokens to keep per batch row (clipped to what the row holds), or per row and KV head
    (``[[head 0, head 1, ...], ...]``: each head its own count). ``scores``: one
    float per kept slot, ``[B, H_kv, L]`` to select per KV head or ``[B, 1, L]`` for one token
    set shared by all heads of the layer (merge heads with ``LayerView.mean_over_heads``, which is
    right under tensor parallelism too) — higher is kept first; ``None`` means "keep by
    recency". ``sinks``/``recent``: leading and trailing tokens of each row (row-local
    positions) that must survive whatever the scores say; the cache clips them to each row's
    ``keep`` (recent window first; with per-head counts, the row's smallest), so a small budget
    is never exceeded to honour them.

    ``head_adaptive`` (Ada-KV, Feng et al. 2024): None keeps each head's own count. A share
    ``alpha`` in [0, 1] lets a row's KV heads share their summed budget (``keep`` times the heads,
    or the sum of the per-head counts): one top-k over the scores of all the row's heads picks it,
    so a head whose scores are concentrated gives tokens to one whose scores are spread; each head
    keeps at least ``int(alpha * its count)`` of its own best (at least 1 when ``alpha > 0``) and
    its protected tokens. Only meaningful when scores are comparable across heads (attention
    probabilities). The layer's buffer is as wide as its fullest head: the other heads' surplus
    slots are masked, held but not attended.
    """

    keep: list[int] | list[list[int]]
    scores: torch.Tensor | None
    sinks: int | list[int] = 0
    recent: int | list[int] = 0
    head_adaptive: float | None = None

    @property
    def per_head(self) -> bool:
        """Whether ``keep`` gives each row a count per KV head (else one count per row)."""
        return bool(self.keep) and isinstance(self.keep[0], (list, tuple))

    def keep_per_head(self, heads: int) -> list[list[int]]:
        """``keep`` as a count per row and KV head (a per-row count repeated for each of ``heads``)."""
        return [list(k) for k in self.keep] if self.per_head else [[k] * heads for k in self.keep]


@dataclass
class ScoringChunk:
    """One forward of a policy's scoring pass (see :meth:`CachePolicy.scoring_inputs`): tokens run through
    the model after the prompt, over the prompt's cache, to be scored; they are removed afterwards.
    ``attention_mask`` ``[B, Q]``: 0 marks a pad (shorter rows are padded on the right); ``info``: the
    policy's own facts about the chunk (which prompt tokens it scores, say)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerView:
    """Read-only view of one layer given to :meth:`CachePolicy.plan`."""

    layer_idx: int
    num_layers: int
    phase: Phase
    layer: KVLayer
    seen: list[int]  # real (non-pad) tokens seen per row, including this forward
    prompt_len: list[int]  # real prompt tokens per row (set at prefill)
    new_tokens: int  # tokens appended by this forward
    #: the policy's own per-layer state (what its ``new_layer_state`` made; values of type ``PerRow`` follow
    #: the rows when they move)
    state: Any = None
    #: this rank's share of the layer's KV heads under tensor parallelism (``core/parallel.py``); None: all
    parallel: TensorParallel | None = None
    #: set by mean_over_heads; a policy whose one-row scores need no merging (the same on every rank: from
    #: positions alone, say) sets it itself, else the cache refuses them under tensor parallelism
    heads_reduced: bool = field(default=False, repr=False)
    #: the layer's attention module (for its rotary embedding)
    module: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seen)

    @property
    def step(self) -> int:
        """Columns the layer has been given, pads included: the same number for every row, so one
        comparison tells how far decoding has gone (per-row loops cost at every layer and step)."""
        return self.layer.total_seen

    @property
    def length(self) -> int:
        """Slots in use (the same for every row and head; unused ones are invalid)."""
        return self.layer.length

    @property
    def keys(self) -> torch.Tensor:
        return self.layer.keys_view()

    @property
    def values(self) -> torch.Tensor:
        """The kept values ``[B, H_kv, L, D]`` (slots as in :attr:`keys`)."""
        return self.layer.values_view()

    @property
    def scaling(self) -> float:
        """The layer's attention scaling (the factor on ``q . k`` before the softmax)."""
        return self.layer.facts.scaling

    @property
    def device(self) -> torch.device:
        """Where the layer's tensors live: build per-plan tensors there (a host tensor copied in waits
        for the device)."""
        return self.layer.device

    @property
    def valid_counts(self) -> list[int]:
        """Valid kept tokens per row, its fullest head's where heads hold different counts (host-side; a
        device sync unless the layer tracks them)."""
        return self.layer.valid_counts()

    @property
    def valid_counts_per_head(self) -> list[list[int]]:
        """Valid kept tokens per row and KV head (host-side; they differ after a head-adaptive plan)."""
        per_head = self.layer.valid_counts_per_head()
        if per_head is None:
            return [[n] * self.layer.kv_heads for n in self.layer.valid_counts()]
        return per_head

    @property
    def positions(self) -> torch.Tensor:
        """Row-local positions ``[B, H_kv, L]`` of the kept tokens; -1 marks invalid slots."""
        return self.layer.local_positions()

    @property
    def since_compress(self) -> int:
        return self.layer.since_compress

    @property
    def freed_below(self) -> list[int]:
        """Per row, the row-local position below which the layer holds nothing any more: the cache frees, in a
        sliding-window layer, what no later query can see (0: nothing freed). A plan that counts the tokens it
        evicts from a span of positions must not count these again (host-side)."""
        return [max(0, self.layer.freed_below - p) for p in self.layer.rows.pad_host]

    def window_attention(self, weights: torch.Tensor | None = None, num_queries: int | None = None) -> torch.Tensor:
        """Attention of the stored query window over the kept keys, summed over queries.

        Returns ``[B, H_kv, L]`` (query heads of a GQA group are averaged). ``weights`` (``[W]`` or
        per row ``[B, W]``, oldest query first; 0 drops a query) weight each query;
        ``num_queries`` uses only the newest ones.
        """
        return self.layer.window_attention(weights=weights, num_queries=num_queries)

    def accumulated_attention(self) -> torch.Tensor:
        return self.layer.accumulated_attention()

    @property
    def kv_heads(self) -> int:
        """KV heads of the whole layer; more than ``keys.shape[1]`` under tensor parallelism, where this
        process holds heads ``head_offset .. head_offset + keys.shape[1]`` of them."""
        return self.layer.kv_heads if self.parallel is None else self.parallel.total

    @property
    def head_offset(self) -> int:
        """Index among the layer's ``kv_heads`` of this process's first KV head (0 without parallelism)."""
        return 0 if self.parallel is None else self.parallel.offset

    def mean_over_heads(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv, L]`` per-head scores -> ``[B, 1, L]``, their mean over every KV head of the layer:
        the way for a policy that keeps one token set per layer to merge its heads.

        Under tensor parallelism this process holds some of the heads: the scores of all ranks are
        gathered and averaged in head order, so every rank keeps the same tokens, the ones a single
        process would (``core/parallel.py``). Without it, ``scores.mean(dim=1, keepdim=True)``.
        """
        self.heads_reduced = True
        if self.parallel is None:
            return scores.mean(dim=1, keepdim=True)
        return self.parallel.mean_over_heads(scores, self.phase)

    def gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv here, ...]`` per-head values -> ``[B, kv_heads, ...]``, every KV head of the layer in head
        order: for a policy ranking slots across all heads itself (KVzip's one ranking over layers and heads).
        Under tensor parallelism every rank's heads are gathered (a collective: call it on every rank); without
        it, ``t``. Slice a result back to this process's heads from ``head_offset``."""
        if self.parallel is None:
            return t
        return self.parallel.gather_heads(t, self.phase)

    def recorded_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored queries ``[B, H_q, W, D]`` (as attention received them: after RoPE and any q-norm) and
        their row-local positions ``[B, W]`` (-1: a pad or an empty slot). Their order is not time order on
        the compiled path (a ring); the positions say which is which."""
        queries, qpos = self.layer.recorded_queries()
        b, w = queries.shape[0], queries.shape[2]
        qpos = qpos.expand(b, w) if qpos.dim() == 1 else qpos
        pad = self.layer.rows.pad.view(-1, 1)
        return queries, torch.where((qpos >= pad) & (qpos >= 0), qpos - pad, torch.full_like(qpos, -1))

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``cos``, ``sin`` ``[B, P, D_rot]`` of this layer's RoPE at ``positions`` ``[B, P]``, as the
        model computes them (see :mod:`kvpolicy.core.rope`, whose ``rotate``/``unrotate`` apply them)."""
        from . import rope

        return rope.cos_sin(self.module, positions)


class CachePolicy(ABC):
    """Decides, per layer, which cached tokens to keep.

    Subclasses set ``name`` (the registry key), ``config_class`` (a pydantic model) and
    ``signals``, and implement :meth:`plan`. ``plan`` is called after the attention of every
    compressible layer in every forward; returning ``None`` keeps everything (and costs
    nothing), so cheap early exits belong at its top.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig | None = None, **overrides: Any):
        from .config import build_config

        self.config = build_config(self.config_class, config, overrides, policy_name=getattr(self, "name", None))

    @property
    def signals(self) -> Signals:
        return NO_SIGNALS

    @property
    def prunes_hidden_states(self) -> bool:
        """True: at prefill, the tokens a layer keeps are the only ones the layers above it
        compute (the cache gathers the hidden states entering the next decoder layer; see
        ``core/hidden_pruning.py``). Needs one token set per layer (every KV head the same)."""
        return False

    def cuts_hidden_after(self, layer_idx: int) -> bool:
        """With :attr:`prunes_hidden_states`: whether the hidden states leaving layer ``layer_idx`` are cut
        to the tokens it kept (default: every layer's); a layer that does not cut passes on every token
        it computed, so the next layer computes (and chooses its cache from) the same tokens."""
        return self.prunes_hidden_states

    def new_layer_state(self) -> Any:
        """A new value for one layer's :attr:`LayerView.state` (a dataclass of the policy's own; fields
        holding :class:`~kvpolicy.core.rows.PerRow` values are re-indexed when rows move), or None for a
        policy that keeps no state."""
        return None

    def setup(self, num_layers: int, compressible: list[bool]) -> None:
        """Called once when the cache meets the model (before the first plan)."""
        self.num_layers = num_layers
        self.compressible = compressible

    @abstractmethod
    def plan(self, view: LayerView) -> Plan | None:
        """Return a :class:`Plan` to compress ``view.layer`` now, or ``None`` to leave it."""

    def headroom(self, layer_idx: int) -> int:
        """Free slots to allocate after a compression, so decoding appends in place."""
        return 64

    #: True when every KV head of a layer keeps the same token set (one mask serves all heads
    #: in the static decode path); per-head policies leave it False.
    shared_positions: ClassVar[bool] = False

    def decode_growth(self, layer_idx: int, prompt_lens: list[int], new_tokens: int) -> int:
        """Most slots a layer can gain over its post-prefill count while decoding ``new_tokens``.

        The static decode path sizes each layer's buffer with this once, so it must be an upper
        bound; the default (every generated token stays) always is. A policy that evicts while
        decoding overrides it with its own schedule to make static buffers as small as its cache.
        """
        return new_tokens

    # ----------------------------------------------------------------- scoring pass (KVzip)
    #: True: after the prompt's forward, before anything is evicted, the cache runs the chunks of
    #: :meth:`scoring_inputs` through the model on top of the prompt's cache, calls :meth:`score` after each
    #: layer's attention, drops the chunks' tokens, and applies :meth:`plan_scored`. The prompt's own
    #: forward (its logits) is unchanged. Run by a wrapper around ``PreTrainedModel.__call__``
    #: (``core/scoring_pass.py``): the cache needs the model and the prompt's token ids, which it sees nowhere else.
    needs_scoring_pass: ClassVar[bool] = False

    def scoring_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[ScoringChunk]:
        """The scoring pass's forwards for a prompt of ``input_ids`` ``[B, T]`` (left-padded: ``attention_mask``)."""
        return []

    def score(self, view: LayerView, query: torch.Tensor, chunk: ScoringChunk) -> None:
        """After a layer's attention in a scoring forward: ``view`` holds the prompt's slots then the chunk's
        (``view.new_tokens`` of them), ``query`` the chunk's queries ``[B, H_q, Q, D]``. Keep what the plan needs
        in ``view.state`` (see :meth:`new_layer_state`)."""
        return None

    def plan_scored(self, views: list[LayerView]) -> list[Plan | None]:
        """The plans of every compressible layer once the scoring pass is done (all at once, so a budget may
        be shared across layers); by default each layer's :meth:`plan`."""
        return [self.plan(view) for view in views]

    def describe(self) -> str:
        return f"{self.name}({self.config.model_dump_json()})"
