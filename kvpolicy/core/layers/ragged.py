"""The head-ragged layer kind: a growing layer whose KV heads may hold different counts, stored without padding.

Why: a head-adaptive plan (kvzip's global ranking, Ada-KV's budgets) keeps a different number of tokens
in each (row, KV head). The rectangular layout of :class:`~kvpolicy.core.layers.dynamic.DynamicLayer`
stores every head padded to the fullest one, so at ``compression_ratio=0.5`` such a policy frees only
a part of the bytes it drops; and rows of a batch keeping different counts (prompts of different lengths)
pad the same way. Here, once a compaction leaves heads or rows uneven, each (row, KV head) is a segment
of one flat buffer (:class:`RaggedStore`), holding its kept tokens, then the tokens appended since, then
room to grow; the padding is not stored.

What attention and the policies read is unchanged: :meth:`keys_view`/:meth:`pos_view` rebuild, column for
column, the rectangle the dynamic kind would hold (the padding as empty slots, position -1), so both kinds
give the same tokens bit for bit (tested). The rebuilt rectangle lives for one layer's attention, not for
the whole cache. Any operation this kind does not do on segments (a compaction, a row reorder, freezing
for the compiled step, a prune-hidden prefill) first turns the layer back into the rectangle and then
runs as the dynamic kind's; a compaction that leaves the heads uneven packs it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dynamic import DynamicLayer


@dataclass
class RaggedStore:
    """One layer's kept tokens as segments of flat buffers, one segment per (row, KV head).

    ``keys``/``values`` ``[N, W]``, ``pos`` ``[N]`` (and ``acc`` ``[N]`` where attention is accumulated);
    segment ``(b, h)`` starts at ``offset[b, h]``. Its first ``head_len[b, h]`` entries are the slots the
    rectangle held before its padding (``width`` columns wide when packed); then the ``appended`` tokens
    every head got since; then free room up to ``capacity[b][h]``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    acc: torch.Tensor | None
    offset: torch.Tensor  # [B, H] (device)
    head_len: torch.Tensor  # [B, H] (device)
    head_len_host: list[list[int]]
    capacity: list[list[int]]  # per segment, host-side
    width: int  # the rectangle's columns when packed
    appended: int = 0
    spare: int = 0  # the fewest entries any segment holds beyond its packed slots (set with ``capacity``)
    #: ``columns()`` of the current layout (keys, values and positions of one step read the same ones)
    _columns: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def pack(cls, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, acc: torch.Tensor | None,
             headroom: int, head_len_host: list[list[int]] | None = None) -> RaggedStore:
        """The rectangle ``keys``/``values`` ``[B, H, L, W]``, ``pos`` ``[B, H, L]`` without the empty slots
        after each head's last valid one (or after its first ``head_len_host[b][h]``, where the caller knows
        every later slot is empty: no device read); each segment gets ``headroom`` free entries."""
        width = pos.shape[2]
        ramp = torch.arange(width, device=pos.device)
        if head_len_host is None:
            head_len = torch.where(pos >= 0, ramp + 1, 0).amax(-1) if width else pos.new_zeros(pos.shape[:2])
            head_len_host = head_len.tolist()  # a device read
        else:
            head_len = torch.tensor(head_len_host, device=pos.device, dtype=torch.long)
        capacity = [[n + headroom for n in row] for row in head_len_host]
        offset, total = _offsets(capacity, pos.device)
        src, dst = _moves(head_len, head_len_host, torch.arange(head_len.numel(), device=pos.device) * width, offset)
        store = cls(keys.new_zeros(total, keys.shape[-1]), values.new_zeros(total, values.shape[-1]),
                    pos.new_full((total,), -1), None if acc is None else acc.new_zeros(total),
                    offset, head_len, head_len_host, capacity, width, spare=headroom)
        store.keys.index_copy_(0, dst, keys.reshape(-1, keys.shape[-1]).index_select(0, src))
        store.values.index_copy_(0, dst, values.reshape(-1, values.shape[-1]).index_select(0, src))
        store.pos.index_copy_(0, dst, pos.reshape(-1).index_select(0, src))
        if acc is not None:
            store.acc.index_copy_(0, dst, acc.reshape(-1).index_select(0, src))
        return store

    @property
    def length(self) -> int:
        """The rectangle's columns: the packed width and the tokens appended since."""
        return self.width + self.appended

    def room(self) -> int:
        """Tokens every segment can still take without growing."""
        return self.spare - self.appended

    def columns(self, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For each rectangle column ``[B, H, count]`` (default: ``length``): the flat entry that holds it, and
        whether it is padding (columns past ``length`` read each segment's free entries, position -1)."""
        if count is None and self._columns is not None:
            return self._columns
        ramp = torch.arange(self.length if count is None else count, device=self.offset.device)
        head_len = self.head_len.unsqueeze(-1)
        src = torch.where(ramp < head_len, ramp, ramp - (self.width - head_len))
        padding = (ramp >= head_len) & (ramp < self.width)
        flat = (self.offset.unsqueeze(-1) + src.clamp_min(0)).clamp_(0, self.pos.shape[0] - 1)
        if count is None:
            self._columns = (flat, padding)
        return flat, padding

    def rectangle(self, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor | None]:
        """Keys, values, positions (padding: -1) and accumulated attention (padding: 0) as the rectangle of
        ``count`` columns (default: ``length``; up to ``length + room()``)."""
        flat, padding = self.columns(count)
        keys, values = self.keys[flat], self.values[flat]
        pos = self.pos[flat].masked_fill_(padding, -1)
        acc = None if self.acc is None else self.acc[flat].masked_fill_(padding, 0.0)
        return keys, values, pos, acc

    def append(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, headroom: int) -> None:
        """Write ``q`` new tokens (``[B, H, q, W]``, positions ``[B, H, q]``) after each segment's last."""
        q = keys.shape[2]
        if self.room() < q:
            self._grow(q + headroom)
        ramp = torch.arange(q, device=self.offset.device)
        dst = (self.offset + self.head_len + self.appended).unsqueeze(-1) + ramp
        dst = dst.flatten()
        self.keys.index_copy_(0, dst, keys.flatten(0, 2))
        self.values.index_copy_(0, dst, values.flatten(0, 2))
        self.pos.index_copy_(0, dst, pos.flatten())
        if self.acc is not None:
            self.acc.index_fill_(0, dst, 0.0)
        self.appended += q
        self._columns = None

    def _grow(self, extra: int) -> None:
        """New buffers where each segment has ``extra`` free entries (all move: one copy per growth)."""
        used = [[n + self.appended for n in row] for row in self.head_len_host]
        capacity = [[n + extra for n in row] for row in used]
        offset, total = _offsets(capacity, self.offset.device)
        src, dst = _moves(self.head_len + self.appended, used, self.offset, offset)
        for name, fill in (("keys", 0.0), ("values", 0.0), ("pos", -1), ("acc", 0.0)):
            old = getattr(self, name)
            if old is None:
                continue
            new = old.new_full((total, *old.shape[1:]), fill)
            new[dst] = old[src]
            setattr(self, name, new)
        self.offset, self.capacity, self.spare = offset, capacity, self.appended + extra
        self._columns = None

    def _pad_to(self, entries: float) -> None:
        """Buffers of at least ``entries`` entries, the extra ones free (after the last segment)."""
        extra = int(entries) - self.keys.shape[0]
        if extra <= 0:
            return
        for name, fill in (("keys", 0.0), ("values", 0.0), ("pos", -1), ("acc", 0.0)):
            old = getattr(self, name)
            if old is not None:
                setattr(self, name, torch.cat([old, old.new_full((extra, *old.shape[1:]), fill)]))

    def stored_entries(self, allocated: bool) -> int:
        """Entries (one key or value vector each, per buffer) in use, or allocated."""
        if allocated:  # the buffers' size (a repack into larger buffers, frozen_ragged.py, may leave some unused)
            return self.keys.shape[0]
        return sum(n + self.appended for row in self.head_len_host for n in row)


def _offsets(capacity: list[list[int]], device: torch.device) -> tuple[torch.Tensor, int]:
    """Where each segment starts ``[B, H]`` when segment ``(b, h)`` takes ``capacity[b][h]`` entries, and
    the entries in all (one at least: a padding column must index something); sized on the host."""
    sizes = torch.tensor(capacity, device=device, dtype=torch.long)
    offset = sizes.flatten().cumsum(0).view_as(sizes) - sizes
    return offset, max(sum(map(sum, capacity)), 1)


def _moves(lengths: torch.Tensor, lengths_host: list[list[int]], src_start: torch.Tensor, dst_start: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat source and destination indices of the first ``lengths[b, h]`` entries of every segment, from
    segments starting at ``src_start`` to ones starting at ``dst_start`` (both ``[B, H]``). The count is
    known on the host, so no index is read back from the device (a boolean mask would be)."""
    count = sum(map(sum, lengths_host))
    flat = lengths.flatten()
    segment = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat, output_size=count)
    within = torch.arange(count, device=flat.device) - (flat.cumsum(0) - flat)[segment]
    return src_start.flatten()[segment] + within, dst_start.flatten()[segment] + within


class SegmentedBuffers:
    """What the two head-ragged kinds share (this growing one and the frozen one, ``frozen_ragged.py``): the
    rectangle's buffers as properties that turn a packed layer back into the rectangle when touched, and the
    views, shapes and accounting read from the segments without unpacking. Mixed in before a layer kind."""

    _store: RaggedStore | None

    def _init_segments(self) -> None:
        self._store = None
        self._rect: dict[str, torch.Tensor | None] = {"keys": None, "values": None, "pos": None, "acc": None}

    # the rectangle's buffers: reading or writing one turns a packed layer back into the rectangle
    def _buffer(name: str):  # noqa: N805 - a property factory, run in the class body
        def get(self):
            if name == "acc" and self._store is not None and self._store.acc is None:
                return None  # asking whether there is any: no reason to unpack
            self._unpack()
            return self._rect[name]

        def set_(self, value):
            if self._store is not None and value is not None:
                self._unpack()
            elif value is None and name == "keys":
                self._store = None  # a reset, or a layer handing its buffers on
            self._rect[name] = value

        return property(get, set_)

    keys = _buffer("keys")
    values = _buffer("values")
    pos = _buffer("pos")
    acc = _buffer("acc")
    del _buffer

    @property
    def packed(self) -> bool:
        """Whether the layer is held as segments now (its heads or rows hold different counts)."""
        return self._store is not None

    def _unpack(self) -> None:
        store = self._store
        if store is None:
            return
        self._store = None
        keys, values, pos, acc = store.rectangle(self._unpacked_columns(store))
        self._rect.update(keys=keys, values=values, pos=pos, acc=acc)

    def _unpacked_columns(self, store: RaggedStore) -> int | None:
        """The rectangle's columns when unpacked (None: the slots in use)."""
        return None

    def keys_view(self) -> torch.Tensor:
        if self._store is None or self.attended is not None:
            return super().keys_view()
        flat, _ = self._store.columns()
        return self.spec.codec.decode(self._store.keys[flat], self.dtype)

    def values_view(self) -> torch.Tensor:
        if self._store is None or self.attended is not None:
            return super().values_view()
        flat, _ = self._store.columns()
        return self.spec.codec.decode(self._store.values[flat], self.dtype)

    def pos_view(self) -> torch.Tensor:
        if self._store is None:
            return super().pos_view()
        flat, padding = self._store.columns()
        return self._store.pos[flat].masked_fill_(padding, -1)

    @property
    def capacity(self) -> int:
        if self._store is None:
            return super().capacity
        return self.length + self._store.room()

    @property
    def kv_heads(self) -> int:
        return self._store.offset.shape[1] if self._store is not None else super().kv_heads

    @property
    def batch_size(self) -> int:
        return self._store.offset.shape[0] if self._store is not None else super().batch_size

    @property
    def holds_tokens(self) -> bool:
        return self._store is not None or super().holds_tokens

    def kv_bytes(self, allocated: bool = True) -> int:
        if self._store is None:
            return super().kv_bytes(allocated)
        keys = self._store.keys
        return 2 * self._store.stored_entries(allocated) * keys.shape[1] * keys.element_size()

    def signal_bytes(self) -> int:
        if self._store is None:
            return super().signal_bytes()
        held = (self._store.acc, self._store.pos, getattr(self, "qwin", None), getattr(self, "qring", None))
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def head_lengths_after_compaction(self) -> list[list[int]]:
        """Each (row, KV head)'s kept count after a compaction (which leaves them first and counts them)."""
        deficit = self.head_deficit or [[0] * self.kv_heads for _ in self.valid_host]
        return [[n - d for d in row] for n, row in zip(self.valid_host, deficit)]


class RaggedLayer(SegmentedBuffers, DynamicLayer):
    """The growing kind that stores a layer whose heads or rows hold different counts as segments
    (:class:`RaggedStore`); until a compaction leaves it so, it is exactly :class:`DynamicLayer`."""

    def __init__(self, spec):
        self._init_segments()
        super().__init__(spec)

    def _pack(self, head_len: list[list[int]]) -> None:
        r = self._rect
        n = self.length
        acc = None if r["acc"] is None else r["acc"][:, :, :n]
        self._store = RaggedStore.pack(r["keys"][:, :, :n], r["values"][:, :, :n], r["pos"][:, :, :n], acc,
                                       self.spec.headroom, head_len)
        self._rect.update(keys=None, values=None, pos=None, acc=None)

    # ----------------------------------------------------------------- what changes when packed
    def compact(self, index, keep_counts, start=None, group_uneven=None) -> None:
        super().compact(index, keep_counts, start, group_uneven)
        if self._rect["keys"].requires_grad:
            return  # under autograd the buffers must stay as the attention saved them
        head_len = self.head_lengths_after_compaction()
        if any(n < self.length for row in head_len for n in row):  # padding is stored: segments free it
            self._pack(head_len)

    def to_frozen(self, spec):
        """A packed layer freezes as segments (``frozen_ragged.py``: the compiled step's kernel reads them),
        except under H2O's accumulated attention, which the compiled step adds up in a rectangle."""
        if self._store is not None and self._store.acc is None:
            from .frozen_ragged import FrozenRaggedLayer

            return FrozenRaggedLayer.from_ragged(self, spec)
        return super().to_frozen(spec)

    def append(self, key_states, value_states, positions=None, width=None):
        store = self._store
        if store is None or positions is not None or key_states.requires_grad:
            return super().append(key_states, value_states, positions, width)
        self._check_compatible(key_states)
        b, h, q = key_states.shape[:3]
        codec = self.spec.codec
        new_pos = torch.arange(self.total_seen, self.total_seen + q, device=key_states.device).expand(b, h, q)
        store.append(codec.encode(key_states), codec.encode(value_states), new_pos, self.spec.headroom)
        if self.valid_host is not None:
            self.valid_host = [n + q for n in self.valid_host]
        self.length = store.length
        self.total_seen += q
        self.since_compress += q
        self.attended = None
        keys, values = self.keys_view(), self.values_view()
        if codec.quantized:
            self.attended = (keys, values)
        return keys, values

    def _check_compatible(self, key_states: torch.Tensor) -> None:
        if self._store is None:
            return super()._check_compatible(key_states)
        width = self._store.keys.shape[-1] - self.spec.codec.stored_width(0)
        if (key_states.shape[0], key_states.shape[1]) != tuple(self._store.offset.shape) or \
                key_states.shape[3] != width or key_states.dtype != self.dtype:
            self._unpack()
            super()._check_compatible(key_states)

    def drop_last(self, q: int) -> None:
        self._unpack()
        super().drop_last(q)

    def reset(self) -> None:
        self._store = None
        super().reset()
