"""The growing layer kind: buffers grow and shrink with what the policy keeps (prefill, eager decoding).

Appends write in place; the buffer grows by the policy's headroom only when full, and a compression
gathers the kept slots into a right-sized buffer so the evicted memory is really returned.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import CacheMisuseError
from ..rows import Rows
from .base import FreezeSpec, KVLayer


class DynamicLayer(KVLayer):
    """The kind every cache starts with; :meth:`to_frozen` gives the fixed-shape kind of the compiled
    decode step (:class:`~kvpolicy.core.layers.frozen.FrozenLayer`), whose ``to_dynamic`` gives this kind back."""

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None,
               width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
            self.contiguous = self.complete = False  # a prune-hidden prefill: tokens the layer never got
            self.valid_host = None  # empty slots (-1) are counted on the device
        first_fill = self.keys is None or self.length == 0 and self.capacity < q
        if first_fill:
            # adopt the tensors as the buffer (no copy unless the codec converts); growth happens on decode
            self.keys, self.values = self.stored(key_states, value_states)
            self.pos = new_pos.contiguous()
            if self.spec.track_attention:
                self.acc = torch.zeros(b, h, q, dtype=torch.float32, device=key_states.device)
            self.length = q
        else:
            self._check_compatible(key_states)
            # under autograd an earlier forward's attention saved the buffers: append into new ones
            if self.length + q > self.capacity or key_states.requires_grad or self.keys.requires_grad:
                self._reallocate(self.length + q + self.spec.headroom)
            end = self.length + q
            codec = self.spec.codec
            self.keys[:, :, self.length : end] = codec.encode(key_states)
            self.values[:, :, self.length : end] = codec.encode(value_states)
            self.pos[:, :, self.length : end] = new_pos
            if self.acc is not None:
                self.acc[:, :, self.length : end] = 0.0
            self.length = end
        self.total_seen += q if width is None else width
        self.since_compress += q
        self.attended = None
        if self.spec.codec.quantized:  # the prompt attends and is scored by its own keys exactly; later, decoded once
            self.attended = (key_states, value_states) if first_fill else (self.keys_view(), self.values_view())
        return self.keys_view(), self.values_view()

    def stored(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers the first fill keeps (later appends write into them): the new tensors in the
        codec's form (themselves at ``kv_dtype="auto"``)."""
        codec = self.spec.codec
        return codec.encode(key_states).contiguous(), codec.encode(value_states).contiguous()

    def _check_compatible(self, key_states: torch.Tensor) -> None:
        held, given = list(self.keys.shape), key_states.shape
        held[3] = self.spec.codec.head_dim(held[3])  # the head dimension the packed rows hold
        if given[0] != held[0]:
            raise CacheMisuseError(
                f"this cache holds a batch of {held[0]} rows but was given {given[0]}; "
                "make a new cache for each generate call (or call cache.reset())"
            )
        if given[1] != held[1] or given[3] != held[3] or key_states.dtype != self.dtype:
            raise CacheMisuseError(
                f"this cache holds keys of shape heads={held[1]}, head_dim={held[3]}, {self.dtype} from "
                f"another model, now given heads={given[1]}, head_dim={given[3]}, {key_states.dtype}; "
                "use a new cache per model (or call cache.reset())"
            )

    def _compaction_target(self, kept: int, fresh: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A right-sized new set when the old one is too small or would waste more than twice the headroom
        (the prefill case: the evicted memory is really returned), or must not change (``fresh``), else the
        current buffers, in place."""
        slack = self.capacity - kept
        if 0 <= slack <= 2 * self.spec.headroom and not fresh:
            return self.keys, self.values, self.pos, self.acc
        return self.new_buffers(kept + self.spec.headroom)

    def to_frozen(self, spec: FreezeSpec) -> KVLayer:
        from .frozen import FrozenLayer

        return FrozenLayer.from_dynamic(self, spec)

    @classmethod
    def concat(cls, parts: list[DynamicLayer], rows: Rows) -> DynamicLayer:
        """One layer holding the rows of ``parts`` (the same layer of row chunks of one batch, each
        left-padded to the same width) in order; a part with fewer slots gets empty ones (pos -1).
        The parts' buffers are released."""
        ref = parts[0]
        spec = ref.spec
        layer = cls(dataclasses.replace(spec, rows=rows))
        layer.carry_over(ref)
        layer.since_compress = max(p.since_compress for p in parts)
        layer.length = max(p.length for p in parts)
        layer.contiguous = all(p.contiguous for p in parts) and all(p.length == layer.length for p in parts)
        layer.complete = all(p.complete for p in parts)
        counts = [n for p in parts for n in p.valid_counts()]
        for p in parts:  # in-use slots only
            p.keys, p.values, p.pos = p.keys[:, :, : p.length], p.values[:, :, : p.length], p.pos_view()
            if p.acc is not None:
                p.acc = p.acc[:, :, : p.length]
        layer.keys = _joined([p.keys for p in parts], 0.0)
        layer.values = _joined([p.values for p in parts], 0.0)
        layer.pos, layer.acc = _joined([p.pos for p in parts], -1), _joined([p.acc for p in parts], 0.0)
        layer.qwin = _joined([p.qwin for p in parts], 0.0, at_front=True)  # a query window fills from the back
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
        layer.head_deficit = None
        if any(p.head_deficit is not None for p in parts):
            layer.valid_host = None  # heads hold different counts: recounted per head on the device
        for p in parts:
            p.keys = p.values = p.pos = p.acc = p.qwin = p.qwin_pos = None
        return layer


def _joined(tensors: list[torch.Tensor | None], fill: float, at_front: bool = False) -> torch.Tensor | None:
    """``tensors`` (one per row chunk) concatenated over rows, each filled to the widest along dim 2."""
    if tensors[0] is None:
        return None
    width = max(t.shape[2] for t in tensors)
    out = []
    for t in tensors:
        if t.shape[2] < width:
            pad_shape = list(t.shape)
            pad_shape[2] = width - t.shape[2]
            filler = t.new_full(pad_shape, fill)
            t = torch.cat([filler, t] if at_front else [t, filler], dim=2)
        out.append(t)
    return torch.cat(out, dim=0)
