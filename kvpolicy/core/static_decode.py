"""A fixed-shape decode cache: the compressed prompt frozen into per-layer buffers of constant size.

Why: an eager decode step of a 7B model is bound by per-step launch overhead (about 90 ms on
an H100 whatever the batch), and a compiled *full* static cache beats any eager compressed
cache. To compile the step (``torch.compile``, CUDA graphs) every tensor it touches must keep
its shape and its address. So after prefill each layer gets a buffer of ``kept + growth``
slots, where the policy's :meth:`~kvpolicy.CachePolicy.decode_growth` bounds what decoding can
add; a step writes its key/value at the layer's slot tensor and attends over the whole buffer
under a validity mask; and between steps, eagerly, the policy's plan runs exactly as in the
eager path and gathers the kept slots in place. The decode step itself therefore holds no
Python state that changes from step to step — the compiled graph is replayed as is.

Built by :meth:`StaticPolicyCache.freeze` from one or more prefilled :class:`PolicyCache`
objects (several when the prompt batch was prefilled in row chunks); driven by
:func:`kvpolicy.generation.generate_static`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import attention_hook
from .cache import PolicyCache
from .errors import CacheMisuseError, UnsupportedModelError
from .layer_store import PolicyLayer, first_moved_slot


class StaticPolicyCache(PolicyCache):
    """A :class:`PolicyCache` whose decode step is compile- and CUDA-graph-friendly.

    Only decoding goes through it (one token per row per forward); the prompt is prefilled
    by ordinary ``PolicyCache`` objects and frozen here.
    """

    is_compileable = True

    @classmethod
    def freeze(cls, caches: list[PolicyCache], new_tokens: int, consume: bool = False) -> StaticPolicyCache:
        """Stack prefilled caches (row chunks of one left-padded batch) into static buffers sized
        for ``new_tokens`` more tokens per row.

        ``consume`` frees each layer of the given caches as soon as it is copied, so the peak is
        about one static cache rather than a static cache plus all the prefilled ones.
        """
        first = caches[0]
        policy = first.policy
        if any(c.policy.describe() != policy.describe() for c in caches):
            raise CacheMisuseError("the prefilled caches were made with different policies")
        if policy.signals.accumulated_attention:
            raise UnsupportedModelError(
                f"policy {policy.name!r} scores every decode step with accumulated attention, which the "
                "static decode path does not compute; use model.generate(past_key_values=cache) instead"
            )
        if any(c.prompt_len is None or len(c.layers) != len(first.layers) for c in caches):
            raise CacheMisuseError("freeze() takes caches that have been through one prefill forward")
        self = cls(policy)
        self._adapter, self._windows = first._adapter, first._windows
        self._num_layers, self._compressible = first._num_layers, first._compressible
        self._setup_done = True
        self.pad = torch.cat([c.pad for c in caches])
        self.pad_host = [p for c in caches for p in c.pad_host]
        self.prompt_len = [n for c in caches for n in c.prompt_len]
        self._policy_state = _merge_states([c._policy_state for c in caches], [len(c.prompt_len) for c in caches])
        self._window = policy.signals.decode_query_window
        self._shared = bool(policy.shared_positions)
        device = first.pad.device
        self.abs_pos = torch.full((1,), first.layers[0].total_seen, dtype=torch.long, device=device)
        self._last_layer = len(first.layers) - 1
        for idx in range(len(first.layers)):
            parts = [c.layers[idx] for c in caches]
            growth = policy.decode_growth(idx, self.prompt_len, new_tokens) if parts[0].compressible else new_tokens
            layer = _stack_layer(self, idx, parts, max(p.length for p in parts) + growth, self._window)
            self.layers.append(layer)
            if consume:
                for part in parts:
                    part.keys = part.values = part.pos = part.qwin = part.acc = None
        self.slots = torch.tensor([layer.length for layer in self.layers], dtype=torch.long, device=device)
        for t in [self.slots, self.abs_pos, self.pad]:
            torch._dynamo.mark_static_address(t)
        return self

    # ----------------------------------------------------------------- the compiled step
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if key_states.shape[2] != 1:
            raise CacheMisuseError(
                "a StaticPolicyCache takes one token per row per forward (decoding); prefill with a "
                "PolicyCache and freeze it, as kvpolicy.generation.generate_static does"
            )
        layer = self.layers[layer_idx]
        b, h = key_states.shape[:2]
        slot = self.slots[layer_idx : layer_idx + 1]
        layer.keys.index_copy_(2, slot, key_states)
        layer.values.index_copy_(2, slot, value_states)
        layer.pos.index_copy_(2, slot, self.abs_pos.view(1, 1, 1).expand(b, h, 1))
        return layer.keys, layer.values

    def attend(self, fn: Callable, impl: str, module: Any, query, key, value, args: tuple, kwargs: dict):
        """Attention of one decode step over a whole static layer (called by the attention wrapper)."""
        if impl not in ("sdpa", "eager"):
            raise CacheMisuseError(
                f"attention implementation {impl!r} takes no arbitrary mask, which the static decode path "
                "needs; load the model with attn_implementation='sdpa' or 'eager'"
            )
        idx = module.layer_idx
        layer = self.layers[idx]
        if args:
            args = args[1:]  # transformers' mask: replaced by the layer's own
        else:
            kwargs.pop("attention_mask", None)
        pos = layer.pos[:, :1] if self._shared else layer.pos
        allowed = pos >= self.pad.view(-1, 1, 1)
        window = self._windows[idx]
        if window is not None:
            allowed = allowed & (pos > self.abs_pos - window)
        allowed = allowed.unsqueeze(2)  # [B, H or 1, 1, L]
        if layer.qring is not None:
            layer.qring.index_copy_(2, self.abs_pos % self._window, query)
        out = attention_hook.attend_masked(fn, impl, module, query, key, value, allowed, None, args, kwargs)
        if idx == self._last_layer:
            self.slots.add_(1)
            self.abs_pos.add_(1)
        return out

    # ----------------------------------------------------------------- between steps (eager)
    def advance(self, another_step: bool = True) -> None:
        """Account for the token the last compiled step appended, then let the policy compress;
        with ``another_step``, check that every layer has a free slot for the next token.

        Plans see exactly what the eager path's plans see after the same token's attention,
        so both paths keep the same tokens.
        """
        for layer in self.layers:
            layer.length += 1
            layer.total_seen += 1
            layer.since_compress += 1
            layer.valid_host = [n + 1 for n in layer.valid_host]
        due = [(layer, sel) for layer in self.layers if layer.compressible and (sel := self._plan_layer(layer))]
        if due:  # one read of the device for all layers (each read drains the queue)
            starts = torch.stack([first_moved_slot(index) for _, (index, _) in due]).tolist()
            for (layer, (index, keep)), start in zip(due, starts):
                layer.compact(index, keep, start)
                self.slots[layer.layer_idx] = layer.length
        if another_step:
            for layer in self.layers:
                if layer.length >= layer.capacity:
                    raise CacheMisuseError(
                        f"layer {layer.layer_idx} filled its static buffer ({layer.capacity} slots): "
                        f"{type(self.policy).__name__}.decode_growth() under-estimates decode growth, or more "
                        "tokens were generated than freeze() was sized for"
                    )

    def _plan_layer(self, layer: PolicyLayer) -> tuple[torch.Tensor, list[int]] | None:
        """The policy's plan for ``layer`` turned into slots to keep; None when it keeps all."""
        seen = self._seen_real(layer)
        plan = self.policy.plan(self._view(layer, seen, 1, prefill=False))
        return None if plan is None else self._select(layer, plan, seen)


def _stack_layer(
    owner: StaticPolicyCache, idx: int, parts: list[PolicyLayer], capacity: int, window: int
) -> PolicyLayer:
    """One static layer from the same layer of each row chunk; unused slots get position -1."""
    ref = parts[0]
    layer = PolicyLayer(owner, idx)
    for attr in (
        "module_ref", "scaling", "compressible", "device", "dtype", "is_initialized", "total_seen", "since_compress"
    ):
        setattr(layer, attr, getattr(ref, attr))
    rows = sum(p.keys.shape[0] for p in parts)
    _, h, _, d = ref.keys.shape
    layer.keys = ref.keys.new_zeros(rows, h, capacity, d)
    layer.values = ref.values.new_zeros(rows, h, capacity, d)
    layer.pos = ref.pos.new_full((rows, h, capacity), -1)
    recorded = min(window, ref.qwin.shape[2]) if window and ref.qwin is not None else 0
    if recorded:
        layer.qring = ref.qwin.new_zeros(rows, ref.qwin.shape[1], window, d)
        layer.ring_start = ref.total_seen - recorded
    start = 0
    for p in parts:
        end = start + p.keys.shape[0]
        layer.keys[start:end, :, : p.length] = p.keys_view()
        layer.values[start:end, :, : p.length] = p.values_view()
        layer.pos[start:end, :, : p.length] = p.pos_view()
        if recorded:
            qpos = p.qwin_pos[..., -recorded:]
            if qpos.dim() == 2:  # per-row positions (prune-hidden prefill): the recent window agrees
                qpos = qpos.max(0).values
            layer.qring[start:end].index_copy_(2, qpos % window, p.qwin[:, :, -recorded:])
        start = end
    layer.length = max(p.length for p in parts)
    layer.valid_host = [n for p in parts for n in p.valid_counts()]
    layer.contiguous = False
    layer.static = True
    for t in (layer.keys, layer.values, layer.pos, layer.qring):
        if t is not None:
            torch._dynamo.mark_static_address(t)
    return layer


def _merge_states(states: list[dict[int, dict]], rows: list[int]) -> dict[int, dict]:
    """Concatenate the policies' per-row lists (by convention, lists with one entry per row)."""
    merged: dict[int, dict] = {}
    for layer_idx in states[0]:
        out: dict[str, Any] = {}
        for key, value in states[0][layer_idx].items():
            values = [s[layer_idx][key] for s in states]
            if isinstance(value, list) and all(len(v) == n for v, n in zip(values, rows)):
                out[key] = [x for v in values for x in v]
            else:
                out[key] = value
        merged[layer_idx] = out
    return merged
