"""Segments: one layer's kept tokens as one run of entries per (row, KV head) in flat buffers.

The storage of the two head-ragged layer kinds (the growing ``ragged.py`` and the frozen ``frozen_ragged.py``):
:class:`RaggedStore` packs a rectangle without its padding, appends, grows and rebuilds the rectangle;
:class:`SegmentedBuffers` is what both kinds share on top of it (the rectangle's buffers as properties that
unpack when touched, and the views and accounting read from the segments without unpacking).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
