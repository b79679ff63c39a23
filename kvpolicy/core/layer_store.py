"""One layer's kept keys/values, their original positions, and the signals kept beside them.

Layout: ``keys``/``values`` are ``[B, H_kv, capacity, D]`` buffers of which the first
``length`` slots are in use; ``pos`` ``[B, H_kv, capacity]`` holds each slot's absolute
cache index (the column transformers would give it; -1 for an empty slot). A slot is valid
for row ``b`` when ``pos >= pad[b]`` (left padding is never attended). Appends write in
place; the buffer grows by the policy's headroom only when full, and a compression gathers
the kept slots into a right-sized buffer so the evicted memory is really returned.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .errors import CacheMisuseError
from .rows import Rows

_QUERY_CHUNK = 128  # queries scored at once; bounds the [B, H, chunk, L] temporary


class PolicyLayer(CacheLayerMixin):
    """The dynamic layer kind: buffers grow and shrink with what the policy keeps (prefill, eager
    decoding). Its static sibling, :class:`~kvpolicy.core.static_layer.StaticPolicyLayer`, keeps
    fixed shapes and addresses for a compiled decode step.

    ``rows``: the per-row facts shared by the cache's layers; ``headroom``: free slots to allocate
    after a compression (the policy's); ``track_attention``: keep H2O's accumulated attention.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True
    #: per row and KV head, how many fewer valid tokens the head holds than the row's fullest head (after
    #: a head-adaptive plan); None: every head holds the same count. Appends do not change it (every head
    #: gains the same tokens); a recount from the device (``valid_counts``) refreshes it.
    head_deficit: list[list[int]] | None = None
    #: under tensor parallelism: the layer's heads over ALL ranks hold different counts (known to every rank
    #: from the last selection over the whole layer, ``selection.select_per_head_parallel``), so the next selection
    #: must see every head too (this rank's ``head_deficit`` alone may say its heads agree)
    group_uneven: bool = False

    def __init__(self, layer_idx: int, rows: Rows, headroom: int = 64, track_attention: bool = False):
        super().__init__()
        self.rows = rows
        self.headroom = headroom
        self.track_attention = track_attention
        self.layer_idx = layer_idx
        self.length = 0  # slots in use
        self.total_seen = 0  # tokens this layer has been given (absolute, pads included)
        self.since_compress = 0
        self.contiguous = True  # slot i holds absolute token i (no compression yet)
        self.compressible = True
        self.pos: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None  # accumulated attention [B, H, capacity] (float32)
        self.qwin: torch.Tensor | None = None  # recent queries [B, Hq, W, D]
        self.qwin_pos: torch.Tensor | None = None  # their absolute positions [W] (or [B, W], -1: none)
        self.scaling: float | None = None
        self.valid_host: list[int] | None = None  # valid tokens per row once compacted, host-side

    @classmethod
    def concat(cls, parts: list[PolicyLayer], rows: Rows) -> PolicyLayer:
        """One layer holding the rows of ``parts`` (the same layer of row chunks of one batch, each
        left-padded to the same width) in order; a part with fewer slots gets empty ones (pos -1).
        The parts' buffers are released."""
        ref = parts[0]
        layer = cls(ref.layer_idx, rows, ref.headroom, ref.track_attention)
        for attr in ("module_ref", "scaling", "compressible", "device", "dtype", "is_initialized", "total_seen"):
            if hasattr(ref, attr):
                setattr(layer, attr, getattr(ref, attr))
        layer.since_compress = max(p.since_compress for p in parts)
        layer.length = max(p.length for p in parts)
        layer.contiguous = all(p.contiguous for p in parts) and all(p.length == layer.length for p in parts)
        counts = [n for p in parts for n in p.valid_counts()]

        def joined(name: str, fill: float, dim: int = 2) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            if tensors[0] is None:
                return None
            width = max(t.shape[dim] for t in tensors)
            out = []
            for t in tensors:
                if t.shape[dim] < width:
                    pad_shape = list(t.shape)
                    pad_shape[dim] = width - t.shape[dim]
                    filler = t.new_full(pad_shape, fill)
                    # slots of kept tokens fill from the front, a query window from the back
                    t = torch.cat([t, filler] if name != "qwin" else [filler, t], dim=dim)
                out.append(t)
            return torch.cat(out, dim=0)

        for p in parts:  # in-use slots only
            p.keys, p.values, p.pos = p.keys_view(), p.values_view(), p.pos_view()
            if p.acc is not None:
                p.acc = p.acc[:, :, : p.length]
        layer.keys, layer.values = joined("keys", 0.0), joined("values", 0.0)
        layer.pos, layer.acc = joined("pos", -1), joined("acc", 0.0)
        layer.qwin = joined("qwin", 0.0)
        if layer.qwin is not None:
            wins = [p.qwin_pos for p in parts]
            width = layer.qwin.shape[2]
            if all(w.dim() == 1 for w in wins):  # the same absolute positions in every chunk (same width)
                layer.qwin_pos = max(wins, key=lambda w: w.shape[0])
            else:
                per_row = [w.expand(p.keys.shape[0], w.shape[-1]) for w, p in zip(wins, parts)]
                per_row = [torch.cat([w.new_full((w.shape[0], width - w.shape[1]), -1), w], 1) for w in per_row]
                layer.qwin_pos = torch.cat(per_row)
        layer.valid_host = None if layer.contiguous else counts
        layer.group_uneven = any(p.group_uneven for p in parts)
        if any(p.head_deficit is not None for p in parts):
            layer.valid_host = None  # heads hold different counts: recounted per head on the device
        for p in parts:
            p.keys = p.values = p.pos = p.acc = p.qwin = p.qwin_pos = None
        return layer

    # ----------------------------------------------------------------- transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
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
        self.head_deficit = None
        self.length = self.total_seen = self.since_compress = 0
        self.contiguous = True
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if tokens_to_remove > 0:  # legacy: absolute target length
            tokens_to_remove = tokens_to_remove - self.total_seen
        n = -tokens_to_remove
        if n <= 0:
            return
        if not self.contiguous:
            raise CacheMisuseError(
                "crop() cannot undo tokens of a compressed layer (they may already be evicted); "
                "assisted/speculative decoding needs the 'full' policy"
            )
        self.length -= n
        self.total_seen -= n
        self.keys = self.keys[:, :, : self.length]
        self.values = self.values[:, :, : self.length]
        self.pos = self.pos[:, :, : self.length]

    def _rows(self, fn) -> None:
        self.valid_host = None  # recounted from the device on the next valid_counts()
        for name in ("keys", "values", "pos", "acc", "qwin", "qwin_pos"):
            t = getattr(self, name)
            if t is not None and (name != "qwin_pos" or t.dim() == 2):
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self._rows(lambda t: t[indices, ...])

    # ----------------------------------------------------------------- storage
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def keys_view(self) -> torch.Tensor:
        return self.keys[:, :, : self.length]

    def values_view(self) -> torch.Tensor:
        return self.values[:, :, : self.length]

    def pos_view(self) -> torch.Tensor:
        return self.pos[:, :, : self.length]

    def local_positions(self) -> torch.Tensor:
        return self.rows.local(self.pos_view())

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

    def valid_mask(self) -> torch.Tensor:
        return self.rows.valid(self.pos_view())

    def _grow(self, needed: int) -> None:
        """Reallocate to hold ``needed`` slots plus the policy's headroom (rare, amortised)."""
        self._reallocate(needed + self.headroom)

    def _reallocate(self, capacity: int, zero_kv: bool = False) -> None:
        """New buffers of ``capacity`` slots holding the slots in use; the rest empty (position -1).
        ``zero_kv``: zero the empty keys/values too (a static layer attends over every slot, and
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

    def append(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor | None = None,
        width: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``q`` new slots. By default they hold the next ``q`` absolute positions; a
        prune-hidden prefill gives their absolute ``positions`` ``[B, q]`` (-1: an empty slot) out of a
        forward ``width`` tokens wide (what ``total_seen`` advances by)."""
        q = key_states.shape[2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start_abs = self.total_seen
        b, h = key_states.shape[:2]
        if positions is None:
            new_pos = torch.arange(start_abs, start_abs + q, device=key_states.device).expand(b, h, q)
            if self.valid_host is not None:
                self.valid_host = [n + q for n in self.valid_host]
        else:
            new_pos = positions.unsqueeze(1).expand(b, h, q)
            self.contiguous = False
            self.valid_host = None  # empty slots (-1) are counted on the device
        if self.keys is None or self.length == 0 and self.capacity < q:
            # first fill: adopt the tensors as the buffer (no copy); growth happens on decode
            self.keys, self.values = key_states.contiguous(), value_states.contiguous()
            self.pos = new_pos.contiguous()
            if self.track_attention:
                self.acc = torch.zeros(b, h, q, dtype=torch.float32, device=key_states.device)
            self.length = q
        else:
            self._check_compatible(key_states)
            if self.length + q > self.capacity:
                self._grow(self.length + q)
            end = self.length + q
            self.keys[:, :, self.length : end] = key_states
            self.values[:, :, self.length : end] = value_states
            self.pos[:, :, self.length : end] = new_pos
            if self.acc is not None:
                self.acc[:, :, self.length : end] = 0.0
            self.length = end
        self.total_seen += q if width is None else width
        self.since_compress += q
        return self.keys_view(), self.values_view()

    def drop_last(self, q: int) -> None:
        """Forget the last ``q`` slots: the tokens of a scoring pass's forward, appended after the prompt
        (see ``PolicyCache.run_scoring_pass``); the buffer keeps its capacity."""
        self.length -= q
        self.total_seen -= q
        self.since_compress -= q
        if self.valid_host is not None:
            self.valid_host = [n - q for n in self.valid_host]

    def _check_compatible(self, key_states: torch.Tensor) -> None:
        held, given = self.keys.shape, key_states.shape
        if given[0] != held[0]:
            raise CacheMisuseError(
                f"this cache holds a batch of {held[0]} rows but was given {given[0]}; "
                "make a new cache for each generate call (or call cache.reset())"
            )
        if given[1] != held[1] or given[3] != held[3] or key_states.dtype != self.keys.dtype:
            raise CacheMisuseError(
                f"this cache holds keys of shape heads={held[1]}, head_dim={held[3]}, {self.keys.dtype} from "
                f"another model, now given heads={given[1]}, head_dim={given[3]}, {key_states.dtype}; "
                "use a new cache per model (or call cache.reset())"
            )

    def compact(self, index: torch.Tensor, keep_counts: list[int] | list[list[int]], start: int | None = None) -> None:
        """Keep the slots ``index`` ``[B, H or 1, K]`` (sorted by position); row ``b`` keeps ``keep_counts[b]``,
        or head ``h`` of row ``b`` keeps ``keep_counts[b][h]`` (its first ones).

        Rows (heads) keeping fewer than ``K`` get their surplus slots marked invalid (pos = -1), so the
        tensor stays rectangular but attention ignores them. ``start``: the first slot that moves,
        when the caller has read it already (:func:`~kvpolicy.core.selection.first_moved_slot`;
        reading it here waits for the device).
        """
        k = index.shape[2]
        b, h, _, d = self.keys.shape
        index = index.expand(b, h, k)
        idx4 = index.unsqueeze(-1).expand(b, h, k, d)
        keys, values, pos, acc = self._compaction_target(k)
        if keys is not self.keys or self.contiguous:
            # a new buffer; or a first compaction, whose evictions spread over the whole prompt, so
            # that reading the first moved slot back (waiting for the device) would save almost nothing
            start = 0
        else:  # in place: slots before the first one that moves stay as they are
            start = int(first_moved_slot(index)) if start is None else start
            index, idx4 = index[:, :, start:], idx4[:, :, start:]
        gathered_k = self.keys.gather(2, idx4)
        gathered_v = self.values.gather(2, idx4)
        gathered_p = self.pos.gather(2, index)
        gathered_a = None if self.acc is None else self.acc.gather(2, index)
        keys[:, :, start:k] = gathered_k
        values[:, :, start:k] = gathered_v
        pos[:, :, start:k] = gathered_p
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
        self.contiguous = False

    def _compaction_target(self, kept: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The buffers a compaction to ``kept`` slots writes into: a right-sized new set when the old
        one is too small or would waste more than twice the headroom (the prefill case: the evicted
        memory is really returned), else the current buffers, compacted in place."""
        slack = self.capacity - kept
        if 0 <= slack <= 2 * self.headroom:
            return self.keys, self.values, self.pos, self.acc
        b, h, _, d = self.keys.shape
        new_cap = kept + self.headroom
        return (
            self.keys.new_empty(b, h, new_cap, d),
            self.values.new_empty(b, h, new_cap, d),
            self.pos.new_full((b, h, new_cap), -1),
            None if self.acc is None else self.acc.new_zeros(b, h, new_cap),
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

    def _attention_probs(self, queries: torch.Tensor, qpos: torch.Tensor, whole: bool = False) -> torch.Tensor:
        """Softmax attention ``[B, H_kv, G, Q, L]`` (float32; ``G`` query heads per KV head) of ``queries``.

        Costed by memory traffic, since the probabilities are far larger than the queries: the
        scaling goes on the few queries, the logits stay in the cache's dtype until the softmax
        writes float32, and callers sum over ``G`` and ``Q`` in one reduction. ``whole``: over every
        slot of the buffer (a compiled step's fixed shape; unused slots are invalid), not the ones in use.
        """
        keys, pos = (self.keys, self.pos) if whole else (self.keys_view(), self.pos_view())
        b, hkv, L, d = keys.shape
        hq = queries.shape[1]
        g = hq // hkv
        qq = (queries.float() * self.scaling).to(keys.dtype).reshape(b, hkv, g, queries.shape[2], d)
        logits = torch.einsum("bhgqd,bhld->bhgql", qq, keys)
        valid = self.rows.valid(pos).unsqueeze(2).unsqueeze(2)  # [B,H,1,1,L]
        qpos = qpos.view(-1 if qpos.dim() == 2 else 1, 1, 1, qpos.shape[-1], 1)  # [Q] or per row [B, Q]
        causal = pos.unsqueeze(2).unsqueeze(2) <= qpos
        logits = logits.masked_fill(~(valid & causal), float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        return probs.nan_to_num_(nan=0.0)  # a pad query attends to nothing

    def recorded_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The recent queries ``[B, Hq, W, D]`` and their absolute positions (``[W]`` or ``[B, W]``)."""
        if self.qwin is None:
            raise RuntimeError("no queries recorded: the policy must declare a query window in its signals")
        return self.qwin, self.qwin_pos

    def window_attention(self, weights: torch.Tensor | None = None, num_queries: int | None = None) -> torch.Tensor:
        queries, qpos = self.recorded_queries()
        if num_queries is not None:
            queries, qpos = queries[:, :, -num_queries:], qpos[..., -num_queries:]
        w = queries.shape[2]
        if weights is None:
            weights = torch.ones(w, device=queries.device)
        weights = weights[..., -w:].to(device=queries.device, dtype=torch.float32)
        if weights.dim() == 1:
            weights = weights.expand(queries.shape[0], w)
        out = None
        for s in range(0, w, _QUERY_CHUNK):
            probs = self._attention_probs(queries[:, :, s : s + _QUERY_CHUNK], qpos[..., s : s + _QUERY_CHUNK])
            part = torch.einsum("bhgql,bq->bhl", probs, weights[:, s : s + _QUERY_CHUNK])
            out = part if out is None else out + part
        return out / (queries.shape[1] // self.keys.shape[1])  # GQA: the group's query heads averaged

    def accumulate_attention(self, query: torch.Tensor, qpos: torch.Tensor | None = None) -> None:
        """Add the attention of this forward's queries to every kept key (H2O's running score)."""
        q = query.shape[2]
        if qpos is None:
            qpos = self.query_positions(q, query.device)
        for s in range(0, q, _QUERY_CHUNK):
            probs = self._attention_probs(query[:, :, s : s + _QUERY_CHUNK], qpos[..., s : s + _QUERY_CHUNK])
            self.acc[:, :, : self.length] += probs.sum(dim=(2, 3)) / probs.shape[2]  # GQA group averaged

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
        total = 0
        for t in (self.acc, self.qwin, self.pos):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


def first_moved_slot(index: torch.Tensor) -> torch.Tensor:
    """The first slot ``j`` (a 0-d device tensor) where some row or head keeps another slot than ``j``;
    ``K`` when nothing moves. In-place compaction copies only from there on."""
    k = index.shape[2]
    ramp = torch.arange(k, device=index.device)
    moved = (index != ramp).flatten(0, 1).any(0)
    return torch.where(moved, ramp, torch.full_like(ramp, k)).min() if k else ramp.new_zeros(())
