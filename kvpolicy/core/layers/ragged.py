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

import torch

from .dynamic import DynamicLayer
from .segments import RaggedStore, SegmentedBuffers


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

    @classmethod
    def concat(cls, parts, rows):
        """The row chunks of a chunked prefill joined (as the dynamic kind joins them), then packed again where
        their heads or rows hold different counts: without this a prefill in row chunks stored the padding that
        each chunk's compaction had freed."""
        # every part compacted: its kept slots lead each head, so host-side counts give the segments
        # (a part never compacted holds its row's padding in front and is left as the rectangle)
        counts = None
        if all(p.packed or not p.contiguous for p in parts):
            counts = [p.valid_counts_per_head() or [[n] * p.kv_heads for n in p.valid_counts()] for p in parts]
        layer = super().concat(parts, rows)
        if counts is None or layer._rect["keys"] is None or layer._rect["keys"].requires_grad:
            return layer
        head_len = [row for part in counts for row in part]
        if any(n < layer.length for row in head_len for n in row):
            layer.valid_host = [max(row) for row in head_len]
            deficit = [[top - n for n in row] for top, row in zip(layer.valid_host, head_len)]
            layer.head_deficit = deficit if any(any(row) for row in deficit) else None
            layer._pack(head_len)
        return layer

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
        width = self.spec.codec.head_dim(self._store.keys.shape[-1])
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
