"""The frozen layer kind: a layer held in buffers of fixed shape and address for the compiled decode step.

Why: an eager decode step of a 7B model is bound by per-step launch overhead (about 90 ms on
an H100 whatever the batch), and a compiled *full* static cache beats any eager compressed
cache. To compile the step (``torch.compile``, CUDA graphs) every tensor it touches must keep
its shape and address, and it may read no Python number that changes from step to step. So a
frozen layer holds ``kept + reserve`` slots; the step writes its key/value at the layer's
``slot`` tensor and attends over the whole buffer under a validity mask; and between steps,
eagerly, the host counters advance (:meth:`FrozenLayer.settle`) and the policy's plan gathers the
kept slots in place. Plans therefore see exactly what the eager path's plans see after the same
token's attention, so both paths keep the same tokens (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import decode_attention, masks
from ..attention_hook import attend_masked
from ..errors import CacheMisuseError
from . import attention_signals
from .base import FreezeSpec, KVLayer, LayerSpec


class FrozenLayer(KVLayer):
    """One layer of a compiled decode step, made by a growing kind's ``to_frozen``; :meth:`to_dynamic`
    gives that kind back (for a further prefill)."""

    is_compileable = True

    def __init__(self, spec: LayerSpec, freeze: FreezeSpec, thawed_kind: type[KVLayer]):
        super().__init__(spec)
        self.freeze = freeze
        self.thawed_kind = thawed_kind
        self.shared = freeze.shared
        self.qring: torch.Tensor | None = None  # recent queries, slot = position % window
        self.ring_start = 0  # the first position the ring holds
        self.valid_shift = 0  # tokens settled since valid_host was last brought up to date
        self.slot: torch.Tensor | None = None  # [1]: where the next key goes (== length, on the device)
        self.next_pos: torch.Tensor | None = None  # [1]: the absolute position of the next token (== total_seen)

    @classmethod
    def from_dynamic(cls, layer: KVLayer, spec: FreezeSpec) -> FrozenLayer:
        """``layer`` frozen with room for ``spec.capacity`` slots and a ring of ``spec.query_window`` recent
        queries. ``layer``'s buffers are released."""
        self = cls(layer.spec, spec, type(layer))
        self.carry_over(layer)
        b, h, _, d = layer.keys.shape
        n, capacity = layer.length, spec.capacity
        self.keys = layer.keys.new_zeros(b, h, capacity, d)
        self.values = layer.values.new_zeros(b, h, capacity, d)
        self.pos = layer.pos.new_full((b, h, capacity), -1)
        self.keys[:, :, :n] = layer.keys[:, :, :n]  # as stored (codes and scales, where quantized)
        self.values[:, :, :n] = layer.values[:, :, :n]
        self.pos[:, :, :n] = layer.pos_view()
        if layer.acc is not None:
            self.acc = layer.acc.new_zeros(b, h, capacity)
            self.acc[:, :, :n] = layer.acc[:, :, :n]
        self._take_counters(layer)
        self._mark_static()
        layer.keys = layer.values = layer.pos = layer.acc = layer.qwin = None
        return self

    def _take_counters(self, layer: KVLayer) -> None:
        """From the growing ``layer``: its valid counts, its recent queries as the ring, and the device-side
        slot and position counters the compiled step advances."""
        self.valid_host = layer.valid_counts()
        self.head_deficit = layer.head_deficit
        window = self.freeze.query_window
        recorded = min(window, layer.qwin.shape[2]) if window and layer.qwin is not None else 0
        if recorded:
            b, hq, _, d = layer.qwin.shape
            self.qring = layer.qwin.new_zeros(b, hq, window, d)
            self.ring_start = layer.total_seen - recorded
            qpos = layer.qwin_pos[..., -recorded:]
            if qpos.dim() == 2:  # per-row positions (prune-hidden prefill): the recent window agrees
                qpos = qpos.max(0).values
            self.qring.index_copy_(2, qpos % window, layer.qwin[:, :, -recorded:])
        self.contiguous = False
        device = layer.device
        self.slot = torch.full((1,), layer.length, dtype=torch.long, device=device)
        self.next_pos = torch.full((1,), layer.total_seen, dtype=torch.long, device=device)

    def _mark_static(self) -> None:
        for t in (self.keys, self.values, self.pos, self.acc, self.qring, self.slot, self.next_pos):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def to_frozen(self, spec: FreezeSpec) -> KVLayer:
        return self

    def to_dynamic(self) -> KVLayer:
        """The growing kind holding the same slots and recent queries."""
        self.valid_counts()  # fold in the counts settle() deferred
        layer = self.thawed_kind(self.spec)
        layer.carry_over(self)
        n = self.length
        layer.keys, layer.values, layer.pos = self.keys[:, :, :n], self.values[:, :, :n], self.pos[:, :, :n]
        layer.acc = None if self.acc is None else self.acc[:, :, :n]
        if self.qring is not None:  # the ring in slot order, as a window in time order
            ring, pos = self.recorded_queries()
            order = pos.argsort()
            order = order[pos[order] >= 0]
            layer.qwin, layer.qwin_pos = ring[:, :, order], pos[order]
        return layer

    def make_room(self, growth: Callable[[], int]) -> None:
        """Room for the next token; when full, new buffers of ``length + growth()`` slots, by half again at
        least: each re-size re-records the step's graph (transformers compiles with static shapes), so a
        long generation must take few of them."""
        if self.length < self.capacity:
            return
        self._reallocate(max(self.length + growth(), self.capacity * 3 // 2), zero_kv=True)
        self._mark_static()

    # ----------------------------------------------------------------- inside the compiled step
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None,
               width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[2] != 1 or positions is not None:
            raise CacheMisuseError(
                "a compiled decode step takes one token per row; the cache thaws its layers for longer inputs"
            )
        b, h = key_states.shape[:2]
        codec = self.spec.codec
        self.keys.index_copy_(2, self.slot, codec.encode(key_states))
        self.values.index_copy_(2, self.slot, codec.encode(value_states))
        self.pos.index_copy_(2, self.slot, self.next_pos.view(1, 1, 1).expand(b, h, 1))
        self.slot.add_(1)
        self.next_pos.add_(1)
        return codec.decode(self.keys, self.dtype), codec.decode(self.values, self.dtype)

    def attend(self, fn: Callable, impl: str, module: Any, query, key, value, args: tuple, kwargs: dict):
        """This step's attention over the whole buffer, under the layer's own mask (transformers'
        mask, built for slot ``i`` holding token ``i``, is dropped)."""
        if impl not in ("sdpa", "eager"):
            raise CacheMisuseError(
                f"attention implementation {impl!r} takes no arbitrary mask, which the compiled decode step "
                "needs; load the model with attn_implementation='sdpa' or 'eager'"
            )
        if args:
            args = args[1:]
        else:
            kwargs.pop("attention_mask", None)
        qpos = self.next_pos - 1  # append() has run: the token being decoded
        if self.qring is not None:
            self.qring.index_copy_(2, qpos % self.qring.shape[2], query)
        if self.acc is not None:  # H2O: this token's attention, added to every slot's running score
            attention_signals.accumulate_into(self.acc, key, self.pos, self.rows, self.facts.scaling, query, qpos,
                                              self.window)
        if decode_attention.kernel_applies(self.spec.decode_kernel, query, self.spec.codec, kwargs):
            # the stored codes, read once (the dequantized ``key``/``value`` append() returned go unused, and a
            # compiled step never computes them unless H2O's signal above needs them)
            return self._kernel_attention(query, kwargs.get("scaling")), None
        key, value, pos = self._attended_buffers(key, value)
        allowed = masks.allowed(pos[:, :1] if self.shared else pos, self.rows.pad, qpos.view(1, 1, 1, 1), self.window)
        return attend_masked(fn, impl, module, query, key, value, allowed, None, args, kwargs)

    def _kernel_attention(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        return decode_attention.kernel_attention(query, self.keys, self.values, self.pos[:, :1] if self.shared else
                                                 self.pos, self.rows.pad, self.slot, self.next_pos, self.spec.codec,
                                                 self.window, scaling)

    def _attended_buffers(self, key: torch.Tensor, value: torch.Tensor):
        """What SDPA attends when the kernel does not: the keys and values append() returned, and positions."""
        return key, value, self.pos

    # ----------------------------------------------------------------- between steps (eager)
    def settle(self, steps: int) -> None:
        self.length += steps
        self.total_seen += steps
        self.since_compress += steps
        self.valid_shift += steps  # added when asked (valid_counts)

    def valid_counts(self) -> list[int]:
        if self.valid_shift and self.valid_host is not None:
            self.valid_host = [n + self.valid_shift for n in self.valid_host]
        self.valid_shift = 0
        return super().valid_counts()

    def recorded_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qring is None:
            return super().recorded_queries()
        w, last = self.qring.shape[2], self.total_seen - 1
        slot = torch.arange(w, device=self.qring.device)
        pos = last - ((last - slot) % w)
        return self.qring, torch.where(pos >= self.ring_start, pos, torch.full_like(pos, -1))

    def _compaction_target(self, kept: int, fresh: bool = False):
        if kept > self.capacity:
            raise AssertionError("frozen layer asked to hold more than its capacity")  # pragma: no cover
        return self.keys, self.values, self.pos, self.acc

    def compact(self, index: torch.Tensor, keep_counts, start: int | None = None,
                group_uneven: bool | None = None) -> None:
        super().compact(index, keep_counts, start, group_uneven)
        self.valid_shift = 0  # the counts given are the current ones: the settled steps are in them
        self.pos[:, :, self.length :] = -1  # attention reads every slot: stale ones must be invalid
        if self.acc is not None:
            self.acc[:, :, self.length :] = 0.0
        self.slot.fill_(self.length)

    def move_rows(self, fn) -> None:
        """Move rows in place where the batch keeps its size (a compiled step holds the addresses)."""
        self.valid_host = None
        for name in ("keys", "values", "pos", "acc", "qring"):
            t = getattr(self, name)
            if t is None:
                continue
            moved = fn(t)
            if moved.shape == t.shape:
                t.copy_(moved)
            else:
                setattr(self, name, moved)
        self._mark_static()
