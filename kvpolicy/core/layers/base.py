"""What every layer kind is: one layer's kept keys/values, their positions, and the signals beside them.

Layout: ``keys``/``values`` are ``[B, H_kv, capacity, W]`` buffers of which the first ``length``
slots are in use (``W``: the head dimension, or the codec's packed row, ``codecs.py``); ``pos``
``[B, H_kv, capacity]`` holds each slot's absolute cache index (the column transformers would give
it; -1 for an empty slot). A slot is valid for row ``b`` when
``pos >= pad[b]`` (left padding is never attended).

A layer is self-contained, as transformers' layer classes are: what it needs from outside comes
in as small typed values, :class:`LayerSpec` when it is made (which layer, the shared per-row
facts, the policy's headroom and signals) and :class:`ModuleFacts` once its attention module is
seen (scaling, sliding window, whether the policy may compress it). It never sees its cache.
The kinds differ in how they store: :class:`~kvpolicy.core.layers.dynamic.DynamicLayer` grows
and shrinks its buffers (prefill, eager decoding); :class:`~kvpolicy.core.layers.frozen.FrozenLayer`
keeps fixed shapes and addresses for a compiled decode step. ``to_frozen``/``to_dynamic`` turn one
kind into the other; ``docs/architecture.md`` says how to add a kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import masks
from ..errors import CacheMisuseError
from ..rows import Rows
from . import attention_signals
from .codecs import KVCodec


@dataclass(frozen=True)
class LayerSpec:
    """What a layer is told when it is made: its index, the per-row facts every layer of the cache
    shares, the free slots to keep after a compression (the policy's ``headroom``), whether to keep
    H2O's accumulated attention, how each key/value vector is stored (``codec``: the cache's
    ``kv_dtype``, ``codecs.py``), what computes a frozen layer's decode attention (the cache's
    ``decode_kernel``, ``core/decode_attention.py``), and whether it starts recording its past for a rollback
    (transformers' ``activate_past_recording`` came before the layer was made)."""

    layer_idx: int
    rows: Rows
    headroom: int = 64
    track_attention: bool = False
    codec: KVCodec = KVCodec()
    decode_kernel: str = "auto"
    record_past: bool = False


@dataclass(frozen=True)
class ModuleFacts:
    """What a layer learns from its attention module, at the module's first attention: the attention
    scaling, the sliding window (None: global attention), and whether the policy may compress it."""

    scaling: float
    window: int | None = None
    compressible: bool = True


@dataclass(frozen=True)
class FreezeSpec:
    """How to freeze a layer for the compiled decode step: room for ``capacity`` slots, a ring of the
    ``query_window`` most recent queries (0: none), whether every KV head keeps the same positions
    (``shared``: one mask row serves all heads), and whether the policy may compact while decoding
    (``compacts``: a head-ragged frozen layer then keeps spare entries to repack into, ``frozen_ragged.py``)."""

    capacity: int
    query_window: int = 0
    shared: bool = False
    compacts: bool = False


class KVLayer(CacheLayerMixin):
    """The interface every layer kind implements (and the storage they share).

    A kind implements :meth:`append` (store new keys/values, return what attention reads),
    :meth:`to_frozen`/:meth:`to_dynamic`, and may override :meth:`_compaction_target`,
    :meth:`compact`, :meth:`move_rows`, :meth:`make_room`, :meth:`settle` and :meth:`attend`.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.rows = spec.rows
        self.layer_idx = spec.layer_idx
        self.facts: ModuleFacts | None = None
        self.length = 0  # slots in use
        self.total_seen = 0  # tokens this layer has been given (absolute, pads included)
        self.since_compress = 0
        self.contiguous = True  # slot i holds absolute token i (no compression yet)
        #: nothing was removed but what fell out of a sliding window (the cache's own drop): a later query finds
        #: every token it may attend, so the newest tokens can still be cropped (``crop``)
        self.complete = True
        self.freed_below = 0  # absolute column below which the cache freed every slot (out of a sliding window)
        #: transformers' flag for a rollback to come (assisted decoding: ``activate_past_recording``): the cache then
        #: keeps what falls out of a sliding window until the next ``crop``, as transformers' sliding layers do
        self.record_past = spec.record_past
        self.pos: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None  # accumulated attention [B, H, capacity] (float32)
        self.qwin: torch.Tensor | None = None  # recent queries [B, Hq, W, D]
        self.qwin_pos: torch.Tensor | None = None  # their absolute positions [W] (or [B, W], -1: none)
        self.valid_host: list[int] | None = None  # valid tokens per row once compacted, host-side
        #: under a quantizing codec, the keys/values this forward's attention reads (the prompt's first fill: as
        #: the model gave them; later: dequantized once), which the policy's signals read too, until the layer's
        #: attention is done (``release_attended``) or its slots change
        self.attended: tuple[torch.Tensor, torch.Tensor] | None = None
        #: per row and KV head, how many fewer valid tokens the head holds than the row's fullest head (after
        #: a head-adaptive plan); None: every head holds the same count. A recount from the device refreshes it.
        self.head_deficit: list[list[int]] | None = None
        #: under tensor parallelism: the layer's heads over ALL ranks hold different counts (known to every rank
        #: from the last selection over the whole layer), so the next selection must see every head too
        self.group_uneven = False

    def carry_over(self, other: KVLayer) -> None:
        """Take ``other``'s bookkeeping (not its buffers): the step from one kind to another."""
        self.facts = other.facts
        self.length, self.total_seen, self.since_compress = other.length, other.total_seen, other.since_compress
        self.contiguous, self.head_deficit, self.group_uneven = other.contiguous, other.head_deficit, other.group_uneven
        self.complete, self.freed_below, self.record_past = other.complete, other.freed_below, other.record_past
        self.valid_host = other.valid_host
        self.is_initialized = other.is_initialized
        if other.is_initialized:
            self.device, self.dtype = other.device, other.dtype

    # ----------------------------------------------------------------- what a kind implements
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None,
               width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``q`` new tokens and return the keys/values attention reads. By default they hold the next
        ``q`` absolute positions; a prune-hidden prefill gives their ``positions`` ``[B, q]`` (-1: an empty
        slot) out of a forward ``width`` tokens wide (what ``total_seen`` advances by)."""
        raise NotImplementedError

    def to_frozen(self, spec: FreezeSpec) -> KVLayer:
        """This layer as the kind a compiled decode step runs over (its buffers pass to the new layer)."""
        raise NotImplementedError

    @classmethod
    def concat(cls, parts: list[KVLayer], rows: Rows) -> KVLayer:
        """One layer holding the rows of ``parts`` (the same layer of row chunks of one batch), made by
        ``kvpolicy.prefill(..., rows=n)``."""
        raise NotImplementedError(f"{cls.__name__} cannot join row chunks; prefill in one forward (rows=None)")

    def to_dynamic(self) -> KVLayer:
        """This layer as the kind that grows with its inputs (for a forward of several tokens)."""
        return self

    def make_room(self, growth: Callable[[], int]) -> None:
        """Before a compiled step: make sure one more token fits (``growth()``: slots to add when it does not)."""

    def settle(self, steps: int) -> None:
        """Count on the host the ``steps`` tokens compiled steps appended since the last call."""

    def attend(self, fn: Callable, impl: str, module: Any, query, key, value, args: tuple, kwargs: dict):
        raise CacheMisuseError("only a frozen layer attends by itself (inside a compiled decode step)")

    # ----------------------------------------------------------------- transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.spec.codec.check(self.dtype, self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.append(key_states, value_states)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.3 passes cache_position
            query_length = query_length.shape[0]
        return self.total_seen + int(query_length), 0

    def get_seq_length(self) -> int:
        return self.total_seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # abstract in transformers < 5.3
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.pos = self.acc = self.qwin = self.qwin_pos = self.valid_host = None
        self.head_deficit = self.attended = None
        self.length = self.total_seen = self.since_compress = self.freed_below = 0
        self.contiguous = self.complete = True
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if tokens_to_remove > 0:  # legacy: absolute target length
            tokens_to_remove = tokens_to_remove - self.total_seen
        n = -tokens_to_remove
        if n <= 0:
            return
        if not (self.contiguous or self.complete and self.window is not None
                and self.total_seen - n >= self.freed_below + self.window - 1):  # no drop since those n came
            raise CacheMisuseError(
                "crop() cannot undo tokens of a compressed layer (they may already be evicted, or, in a sliding "
                "layer, the tokens the cropped cache's next query sees were freed); assisted/speculative decoding "
                "needs the 'full' policy (and generate's own call to cache.activate_past_recording())"
            )
        self.drop_last(n)
        self.keys = self.keys[:, :, : self.length]
        self.values = self.values[:, :, : self.length]
        self.pos = self.pos[:, :, : self.length]

    def activate_past_recording(self, **kwargs: Any) -> None:
        self.record_past = True

    def move_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Re-index the batch rows (beam reorder, repeat, select): ``fn`` maps a ``[B, ...]`` tensor."""
        if self.keys is None:
            return
        self.valid_host = self.attended = None  # counts: recounted from the device on the next valid_counts()
        self.keys, self.values, self.pos = fn(self.keys), fn(self.values), fn(self.pos)
        self.acc = None if self.acc is None else fn(self.acc)
        self.qwin = None if self.qwin is None else fn(self.qwin)
        if self.qwin_pos is not None and self.qwin_pos.dim() == 2:
            self.qwin_pos = fn(self.qwin_pos)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.move_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.move_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.move_rows(lambda t: t[indices.to(t.device)])

    # ----------------------------------------------------------------- what is kept
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def kv_heads(self) -> int:
        """KV heads this layer holds (read without touching the buffers' layout)."""
        return self.keys.shape[1]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def holds_tokens(self) -> bool:
        """Whether the layer has been given keys yet (and not reset since)."""
        return self.keys is not None

    @property
    def compressible(self) -> bool:
        return self.facts is None or self.facts.compressible

    def attach(self, facts: ModuleFacts) -> None:
        """Learn the attention module's facts (at its first attention)."""
        self.facts = facts

    def keys_view(self) -> torch.Tensor:
        """The kept keys ``[B, H_kv, length, D]`` at the model's dtype (dequantized where the codec quantizes;
        while a forward's attention and plan run, what that attention read: ``attended``)."""
        if self.attended is not None:
            return self.attended[0]
        return self.spec.codec.decode(self.keys[:, :, : self.length], self.dtype)

    def values_view(self) -> torch.Tensor:
        if self.attended is not None:
            return self.attended[1]
        return self.spec.codec.decode(self.values[:, :, : self.length], self.dtype)

    def release_attended(self) -> None:
        """The layer's attention and the policy's plan are done: from now on the stored form is what is read."""
        self.attended = None

    def pos_view(self) -> torch.Tensor:
        return self.pos[:, :, : self.length]

    def local_positions(self) -> torch.Tensor:
        return self.rows.local(self.pos_view())

    def valid_mask(self) -> torch.Tensor:
        return self.rows.valid(self.pos_view())

    def valid_counts(self) -> list[int]:
        """Valid tokens per row, from the host where it can be (a device read drains the GPU's queue):
        a contiguous layer's are the tokens after each row's padding, a compacted one tracks them."""
        if self.valid_host is not None:
            return list(self.valid_host)
        if self.contiguous and self.rows.pad_host is not None:
            return [max(0, n) for n in self.rows.seen(self.total_seen)]
        per_head = self.valid_mask().sum(-1).tolist()  # [B][H]: one device read
        counts = [max(row) for row in per_head]
        deficit = [[n - c for c in row] for n, row in zip(counts, per_head)]
        self.head_deficit = deficit if any(any(row) for row in deficit) else None
        return counts

    def valid_counts_per_head(self) -> list[list[int]] | None:
        """Valid tokens per row and KV head where the heads hold different counts; None where they do not
        (then :meth:`valid_counts` is every head's)."""
        counts = self.valid_counts()  # refreshes head_deficit if it recounts
        if self.head_deficit is None:
            return None
        return [[n - d for d in row] for n, row in zip(counts, self.head_deficit)]

    def allowed(self, qpos: torch.Tensor, one_row: bool = False) -> torch.Tensor:
        """Boolean ``[B, H_kv or 1, Q, L]`` mask of the slots in use that queries at absolute positions
        ``qpos`` (broadcastable to ``[B, 1, Q, 1]``) may attend; ``one_row``: one mask row for all heads."""
        pos = self.pos_view()
        return masks.allowed(pos[:, :1] if one_row else pos, self.rows.pad, qpos, self.window)

    @property
    def window(self) -> int | None:
        return None if self.facts is None else self.facts.window

    def drop_last(self, q: int) -> None:
        """Forget the last ``q`` slots: the tokens of a scoring pass's forward, appended after the prompt
        (see ``core/scoring_pass.py``), or those ``crop`` undoes; the buffer keeps its capacity."""
        self.length -= q
        self.total_seen -= q
        self.since_compress -= q
        self.attended = None
        if self.valid_host is not None:
            self.valid_host = [n - q for n in self.valid_host]

    # ----------------------------------------------------------------- compaction
    def _reallocate(self, capacity: int, zero_kv: bool = False) -> None:
        """New buffers of ``capacity`` slots holding the slots in use; the rest empty (position -1).
        ``zero_kv``: zero the empty keys/values too (a frozen layer attends over every slot, and
        uninitialised memory may hold NaNs that a mask does not cancel)."""
        b, h, _, d = self.keys.shape
        for name, fill in (("keys", 0.0 if zero_kv else None), ("values", 0.0 if zero_kv else None), ("pos", -1),
                           ("acc", 0.0)):
            old = getattr(self, name)
            if old is None:
                continue
            shape = (b, h, capacity, d) if old.dim() == 4 else (b, h, capacity)
            new = old.new_empty(shape) if fill is None else old.new_full(shape, fill)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def compact(self, index: torch.Tensor, keep_counts: list[int] | list[list[int]], start: int | None = None,
                group_uneven: bool | None = None) -> None:
        """Keep the slots ``index`` ``[B, H or 1, K]`` (sorted by position); row ``b`` keeps ``keep_counts[b]``,
        or head ``h`` of row ``b`` keeps ``keep_counts[b][h]`` (its first ones).

        Rows (heads) keeping fewer than ``K`` get their surplus slots marked invalid (pos = -1), so the
        tensor stays rectangular but attention ignores them. ``start``: the first slot that moves,
        when the caller has read it already (:func:`first_moved_slot`; reading it here waits for the
        device). ``group_uneven``: under tensor parallelism, whether the whole layer's heads now hold
        different counts (the selection over all ranks knows).
        """
        k = index.shape[2]
        b, h, _, d = self.keys.shape
        self.attended = None  # the slots change: the stored form is read from here on
        index = index.expand(b, h, k)
        idx4 = index.unsqueeze(-1).expand(b, h, k, d)
        # under autograd the attention that just ran saved these buffers for its backward: gather into new ones
        keys, values, pos, acc = self._compaction_target(k, fresh=self.keys.requires_grad)
        if keys is not self.keys or self.contiguous:
            # a new buffer; or a first compaction, whose evictions spread over the whole prompt, so
            # that reading the first moved slot back (waiting for the device) would save almost nothing
            start = 0
        else:  # in place: slots before the first one that moves stay as they are
            start = int(first_moved_slot(index)) if start is None else start
            index, idx4 = index[:, :, start:], idx4[:, :, start:]
        gathered = self.keys.gather(2, idx4), self.values.gather(2, idx4), self.pos.gather(2, index)
        gathered_a = None if self.acc is None else self.acc.gather(2, index)
        keys[:, :, start:k], values[:, :, start:k], pos[:, :, start:k] = gathered
        if acc is not None:
            acc[:, :, start:k] = gathered_a
        if keep_counts and isinstance(keep_counts[0], (list, tuple)):  # a count per head
            counts = torch.tensor(keep_counts, device=pos.device).view(b, h, 1)
            pos[:, :, :k].masked_fill_(torch.arange(k, device=pos.device).view(1, 1, -1) >= counts, -1)
            per_row = [min(max(row), k) for row in keep_counts]
            deficit = [[n - min(c, k) for c in row] for n, row in zip(per_row, keep_counts)]
            self.valid_host = per_row
            self.head_deficit = deficit if any(any(row) for row in deficit) else None
        else:
            for row, count in enumerate(keep_counts):
                if count < k:
                    pos[row, :, count:k] = -1
            self.valid_host = [min(count, k) for count in keep_counts]
            self.head_deficit = None
        self.keys, self.values, self.pos, self.acc = keys, values, pos, acc
        self.length = k
        self.since_compress = 0
        self.contiguous = self.complete = False
        if group_uneven is not None:
            self.group_uneven = group_uneven

    def _compaction_target(self, kept: int, fresh: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The buffers a compaction to ``kept`` slots writes into (here: the current ones, in place; ``fresh``:
        new ones, since the current ones must not change)."""
        return self.new_buffers(kept) if fresh else (self.keys, self.values, self.pos, self.acc)

    def new_buffers(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Empty keys, values, positions (-1) and accumulated attention for ``capacity`` slots."""
        b, h, _, d = self.keys.shape
        return (
            self.keys.new_empty(b, h, capacity, d),
            self.values.new_empty(b, h, capacity, d),
            self.pos.new_full((b, h, capacity), -1),
            None if self.acc is None else self.acc.new_zeros(b, h, capacity),
        )

    # ----------------------------------------------------------------- signals
    def query_positions(self, q: int, device: torch.device) -> torch.Tensor:
        """Absolute positions ``[q]`` of the newest ``q`` tokens (contiguous forwards)."""
        return torch.arange(self.total_seen - q, self.total_seen, device=device)

    def record_queries(self, query: torch.Tensor, window: int, qpos: torch.Tensor | None = None) -> None:
        """Keep the newest ``window`` queries ``[B, Hq, W, D]`` with their absolute positions
        (``qpos``: ``[B, q]`` for a prune-hidden prefill, -1 for empty slots)."""
        if window <= 0:
            return
        q = query.shape[2]
        if qpos is None:
            qpos = self.query_positions(q, query.device)
        if self.qwin is None or q >= window:
            self.qwin = query[:, :, -window:].detach().clone()
            self.qwin_pos = qpos[..., -window:].clone()
        else:
            self.qwin = torch.cat([self.qwin, query.detach()], dim=2)[:, :, -window:]
            old, b = self.qwin_pos, query.shape[0]
            if old.dim() == 2 or qpos.dim() == 2:  # one of them per row: both per row
                old, qpos = old.expand(b, old.shape[-1]), qpos.expand(b, q)
            self.qwin_pos = torch.cat([old, qpos], dim=-1)[..., -window:]

    def keep_recent_queries(self, window: int) -> None:
        """Forget all but the newest ``window`` recorded queries (what decoding will use)."""
        if self.qwin is None:
            return
        if window == 0:
            self.qwin = self.qwin_pos = None
        elif self.qwin.shape[2] > window:
            self.qwin = self.qwin[:, :, -window:].clone()
            self.qwin_pos = self.qwin_pos[..., -window:].clone()

    def recorded_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The recent queries ``[B, Hq, W, D]`` and their absolute positions (``[W]`` or ``[B, W]``)."""
        if self.qwin is None:
            raise RuntimeError("no queries recorded: the policy must declare a query window in its signals")
        return self.qwin, self.qwin_pos

    def window_attention(self, weights: torch.Tensor | None = None, num_queries: int | None = None) -> torch.Tensor:
        queries, qpos = self.recorded_queries()
        if num_queries is not None:
            queries, qpos = queries[:, :, -num_queries:], qpos[..., -num_queries:]
        return attention_signals.window_attention(
            self.keys_view(), self.pos_view(), self.rows, self.facts.scaling, queries, qpos, weights, self.window
        )

    def accumulate_attention(self, query: torch.Tensor, qpos: torch.Tensor | None = None) -> None:
        """Add the attention of this forward's queries to every kept key (H2O's running score)."""
        if qpos is None:
            qpos = self.query_positions(query.shape[2], query.device)
        attention_signals.accumulate_into(
            self.acc[:, :, : self.length], self.keys_view(), self.pos_view(), self.rows, self.facts.scaling, query,
            qpos, self.window,
        )

    def accumulated_attention(self) -> torch.Tensor:
        if self.acc is None:
            raise RuntimeError("accumulated attention was not requested in the policy's signals")
        return self.acc[:, :, : self.length]

    # ----------------------------------------------------------------- accounting
    def kv_bytes(self, allocated: bool = True) -> int:
        if self.keys is None:
            return 0
        n = self.capacity if allocated else self.length
        per_slot = self.keys.shape[0] * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()
        return 2 * n * per_slot

    def signal_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.acc, self.qwin, self.pos) if t is not None)


def first_moved_slot(index: torch.Tensor) -> torch.Tensor:
    """The first slot ``j`` (a 0-d device tensor) where some row or head keeps another slot than ``j``;
    ``K`` when nothing moves. In-place compaction copies only from there on."""
    k = index.shape[2]
    ramp = torch.arange(k, device=index.device)
    moved = (index != ramp).flatten(0, 1).any(0)
    return torch.where(moved, ramp, torch.full_like(ramp, k)).min() if k else ramp.new_zeros(())
