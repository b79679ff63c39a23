"""The frozen head-ragged kind: a compiled decode step over segments, so a ragged layer's dropped bytes stay freed.

Why: a layer whose heads or rows keep different counts (kvzip, Ada-KV, rows of different prompt lengths)
is stored as one segment per (row, KV head) while it grows (``ragged.py``). The rectangular frozen kind
would pad it out again for the whole decode, so on CUDA's default (compiled) path the bytes were freed
only until the first generated token. Here the segments stay: each gets room for the tokens the policy
may still add (the freeze's reserve), the step writes token ``t`` of segment ``(b, h)`` at flat entry
``end[b, h] + slot``, and the decode kernel (``core/decode_kernel.py``, ``RAGGED``) reads each segment from
``start[b, h]`` to there. Every address and the launch stay fixed from step to step.

Everything else a frozen layer does between steps works on the rectangle the segments stand for: a
compaction turns the layer into that rectangle (``SegmentedBuffers``), compacts it as the rectangular kind,
and packs the result back into the same buffers where it fits (new buffers, and one more graph recording,
where it does not); a row reorder leaves it a rectangle. Where the kernel does not apply (CPU, soft-capping)
the step gathers the rectangle from the segments for SDPA, as the growing ragged kind does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import decode_attention
from .base import FreezeSpec, KVLayer, LayerSpec
from .frozen import FrozenLayer
from .segments import RaggedStore, SegmentedBuffers

#: spare entries a frozen layer of a policy that compacts while decoding keeps beyond its segments, as a share
#: (at most half the padding left out): a compaction that leaves the heads more even than before needs more
#: entries in all (less padding freed)
_SPARE = 0.25


class FrozenRaggedLayer(SegmentedBuffers, FrozenLayer):
    """A frozen layer held as segments (:class:`~kvpolicy.core.layers.ragged.RaggedStore`) while packed;
    once unpacked (a row reorder, or a compaction that evens the heads out) exactly :class:`FrozenLayer`."""

    def __init__(self, spec: LayerSpec, freeze: FreezeSpec, thawed_kind: type[KVLayer]):
        self._init_segments()
        super().__init__(spec, freeze, thawed_kind)
        self.seg_start: torch.Tensor | None = None  # [B, H]: each segment's first flat entry
        self.seg_end: torch.Tensor | None = None  # [B, H]: its entry for rectangle column 0 past the packed ones
        self._columns_at_capacity: tuple[torch.Tensor, torch.Tensor] | None = None
        self._spent: RaggedStore | None = None  # the store last unpacked: its buffers are reused when packing

    @classmethod
    def from_ragged(cls, layer: KVLayer, spec: FreezeSpec) -> FrozenRaggedLayer:
        """The packed growing ``layer`` frozen with room for ``spec.capacity`` rectangle columns; ``layer``'s
        buffers pass over."""
        self = cls(layer.spec, spec, type(layer))
        self.carry_over(layer)
        store = layer._store
        store._grow(spec.capacity - layer.length)  # every segment: its entries, then room for the decode
        if spec.compacts:  # spare entries, so that a repack whose heads hold more even counts fits in place
            self._add_spare(store)
        self._store = store
        self._take_counters(layer)
        self._point_at_segments()
        layer._store = None
        layer.keys = layer.values = layer.pos = layer.acc = layer.qwin = None
        return self

    def _add_spare(self, store: RaggedStore) -> None:
        """A quarter more entries than the segments take, but never more than half the padding they leave
        out: the allocation stays below the rectangle's."""
        packed = store.keys.shape[0]
        rectangle = store.offset.numel() * (self.length + store.room())
        store._pad_to(packed + min(packed * _SPARE, max(0, rectangle - packed) / 2))

    def _point_at_segments(self) -> None:
        """The device tensors the step reads for the current layout, written in place where they exist (the
        compiled graph holds their addresses)."""
        store = self._store
        end = store.offset + store.head_len - store.width
        if self.seg_start is not None and self.seg_start.shape == end.shape:
            self.seg_start.copy_(store.offset)
            self.seg_end.copy_(end)
        else:
            self.seg_start, self.seg_end = store.offset.clone(), end
        store._columns = None
        self._columns_at_capacity = store.columns(self.capacity)
        self._mark_static()

    def _mark_static(self) -> None:
        store = self._store
        if store is None:
            return super()._mark_static()
        held = (store.keys, store.values, store.pos, self.seg_start, self.seg_end, *self._columns_at_capacity,
                self.qring, self.slot, self.next_pos)
        for t in held:
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def _unpacked_columns(self, store: RaggedStore) -> int:
        self._spent = store
        return self.length + store.room()  # the frozen rectangle keeps its free columns

    # ----------------------------------------------------------------- inside the compiled step
    def append(self, key_states, value_states, positions=None, width=None):
        store = self._store
        if store is None or key_states.shape[2] != 1 or positions is not None:  # the last two: the frozen kind's error
            return super().append(key_states, value_states, positions, width)
        codec = self.spec.codec
        dst = (self.seg_end + self.slot).flatten()
        store.keys.index_copy_(0, dst, codec.encode(key_states).flatten(0, 2))
        store.values.index_copy_(0, dst, codec.encode(value_states).flatten(0, 2))
        store.pos.index_copy_(0, dst, self.next_pos.expand(dst.shape[0]))
        self.slot.add_(1)
        self.next_pos.add_(1)
        return key_states, value_states  # attention reads the segments (_kernel_attention, _attended_buffers)

    def _kernel_attention(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        store = self._store
        if store is None:
            return super()._kernel_attention(query, scaling)
        return decode_attention.kernel_attention(query, store.keys, store.values, store.pos, self.rows.pad, self.slot,
                                                 self.next_pos, self.spec.codec, self.window, scaling,
                                                 segments=(self.seg_start, self.seg_end))

    def _attended_buffers(self, key, value):
        store = self._store
        if store is None:
            return super()._attended_buffers(key, value)
        flat, padding = self._columns_at_capacity
        codec = self.spec.codec
        return (codec.decode(store.keys[flat], key.dtype), codec.decode(store.values[flat], value.dtype),
                store.pos[flat].masked_fill(padding, -1))

    # ----------------------------------------------------------------- between steps (eager)
    def settle(self, steps: int) -> None:
        super().settle(steps)
        if self._store is not None:
            self._store.appended += steps
            self._store._columns = None

    def make_room(self, growth: Callable[[], int]) -> None:
        store = self._store
        if store is None:
            return super().make_room(growth)
        if store.room() > 0:
            return
        store._grow(max(growth(), self.capacity // 2))  # new buffers: the step's graph is recorded again
        self.seg_start = None
        self._point_at_segments()

    def compact(self, index: torch.Tensor, keep_counts, start: int | None = None,
                group_uneven: bool | None = None) -> None:
        super().compact(index, keep_counts, start, group_uneven)  # on the rectangle (the buffers unpack)
        head_len = self.head_lengths_after_compaction()
        if any(n < self.length for row in head_len for n in row):
            self._pack(head_len)
        elif self._spent is not None:  # evened out: a rectangle from now on, in new buffers
            self._spent = None
            FrozenLayer._mark_static(self)

    def _pack(self, head_len: list[list[int]]) -> None:
        """The rectangle back into segments, each with the rectangle's free columns as room; into the
        buffers last unpacked where they hold it."""
        r, n = self._rect, self.length
        room = r["keys"].shape[2] - n
        store = RaggedStore.pack(r["keys"][:, :, :n], r["values"][:, :, :n], r["pos"][:, :, :n], None, room, head_len)
        old, self._spent = self._spent, None
        total = store.keys.shape[0]
        if old is not None and old.offset.shape == store.offset.shape:
            if total <= old.keys.shape[0]:  # into the same buffers: the step's graph stays valid
                keys, values, pos = old.keys, old.values, old.pos
                pos.fill_(-1)
                old.offset.copy_(store.offset)
                old.head_len.copy_(store.head_len)
                store.offset, store.head_len = old.offset, old.head_len
                keys[:total].copy_(store.keys)
                values[:total].copy_(store.values)
                pos[:total].copy_(store.pos)
                store.keys, store.values, store.pos = keys, values, pos
            else:  # the heads evened out beyond the spare entries: new buffers (the graph is recorded again)
                self._add_spare(store)
        self._store = store
        self._rect.update(keys=None, values=None, pos=None, acc=None)
        self._point_at_segments()

    def to_dynamic(self) -> KVLayer:
        self._unpack()
        self._spent = None
        return super().to_dynamic()

    def move_rows(self, fn) -> None:
        self._unpack()  # a reorder leaves the layer a rectangle (its counts are not known on the host)
        self._spent = None
        super().move_rows(fn)
