"""Prune-hidden prefill: tokens a layer drops at prefill are not computed by the layers above it.

A policy that sets ``prunes_hidden_states`` (PyramidInfer with ``prefill_mode="prune_hidden"``)
gets this at the prompt's forward: after layer ``l``'s attention the cache keeps layer ``l``'s
tokens as usual; the hidden states entering decoder layer ``l + 1`` are then gathered to
exactly those tokens, with everything positional the layer receives (RoPE cos/sin,
``position_ids``, ``cache_position``). Layer ``l + 1`` computes queries, keys and values only for
them; its cache records their true positions. The model's 4-D mask is not cut (the layer gets
none): the cache's own mask replaces it in such a layer (:meth:`PrunedPrefill.mask`), or, where
causal by slot is exact, SDPA's causal kernel runs with no mask at all. The policy says which
layers cut (``CachePolicy.cuts_hidden_after``, PyramidInfer's ``prune_hidden_start``); a layer
that does not cut hands every token it computed to the next.

The decoder layer is the one place where hidden states and positional inputs meet, and the
cache never sees the model object. So, like ``attention_hook`` does for attention functions,
the family's decoder-layer class (named by its adapter) gets its ``forward`` wrapped once, the
first time a prune-hidden cache meets that family. The wrapper reads a context variable: with
no prune-hidden prefill running in this context (or inside a graph being compiled) it calls
straight through. The cache's side is :class:`PrunedPrefill`, the general mechanism "a policy may
shorten the hidden states between layers" (``CachePolicy.prunes_hidden_states``).

Layout: rows keep different numbers of tokens (left padding, per-row budgets), so the gathered
tensors are rectangular and **right-aligned**, like left padding: each row's kept tokens are
its last slots, in position order, and surplus slots come first (position -1, never attended;
their hidden states copy the row's last token so nothing becomes NaN). The last slot of every
row is the prompt's last token (always in the recent window), which is what ``generate`` reads.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

_MARK = "__kvpolicy_prune_wrapped__"

#: the prune-hidden prefill running in this context (a weak reference to its HiddenPruner), if any
ACTIVE: contextvars.ContextVar[weakref.ref | None] = contextvars.ContextVar("kvpolicy_prune", default=None)


@dataclass
class Layout:
    """Which prompt tokens the current hidden states hold.

    ``pos``: ``[B, T']`` absolute columns (the index transformers gives a token, pads included),
    ascending, surplus slots first as -1; ``None`` while nothing has been dropped (identity).
    ``width``: the prompt's full width ``T``. ``layer``: the decoder layer these inputs feed.
    """

    width: int
    pos: torch.Tensor | None = None
    layer: int = 0
    memo: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)
    #: every row holds as many tokens as the widest (no surplus slot): a layer over exactly these tokens is
    #: causal by slot, as they ascend in position
    dense: bool = True

    @property
    def columns(self) -> torch.Tensor:
        """``pos`` with surplus slots pointing at the last column (a real token in every row)."""
        return torch.where(self.pos >= 0, self.pos, torch.full_like(self.pos, self.width - 1))

    def sliced(self, source: Any, fn: Callable[[Any], Any]) -> Any:
        """``fn(source)``, computed once per layout (every layer gets the same full-width inputs)."""
        hit = self.memo.get(id(source))
        if hit is None or hit[0] is not source:
            hit = self.memo[id(source)] = (source, fn(source))
        return hit[1]


def kept_layout(kept: torch.Tensor, width: int) -> tuple[torch.Tensor, bool]:
    """Right-align kept positions ``[B, K]`` (-1 for surplus anywhere): -1s first, then ascending; and whether
    every row keeps the same count (no surplus slot is left)."""
    ordered = kept.sort(dim=-1).values
    counts = (ordered >= 0).sum(-1).tolist()  # one read of the device
    most = max(counts)
    return ordered[:, ordered.shape[1] - most :], min(counts) == most


def hidden_index(current: torch.Tensor | None, new: torch.Tensor, width: int) -> torch.Tensor:
    """Slot of each position of ``new`` in the current layout (surplus: the row's last slot)."""
    if current is None:
        current = torch.arange(width, device=new.device).expand(new.shape[0], width)
    index = torch.searchsorted(current.contiguous(), new.clamp(min=0).contiguous())
    last = torch.full_like(index, current.shape[1] - 1)
    return torch.where(new >= 0, index, last)


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b]]`` along dim 1 for ``t`` of shape ``[B or 1, T, ...]``."""
    t = t.expand(index.shape[0], *t.shape[1:])
    idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    return t.gather(1, idx)


class HiddenPruner:
    """One prune-hidden prefill, the object the cache asks: which tokens a layer's inputs hold, and
    how to cut a decoder layer's inputs to what the layer below it kept.

    The cache tells it what each layer kept (:meth:`layer_done`, after the layer's compression);
    the decoder-layer wrapper asks it to cut the next layer's inputs (:meth:`enter`). It holds no
    reference to the cache.
    """

    def __init__(self, adapter: Any, config: Any, num_layers: int, width: int):
        self.adapter, self.config, self.num_layers = adapter, config, num_layers
        self.layout = Layout(width=width)
        self.running = True
        self._kept: torch.Tensor | None = None  # [B, H, L] positions the last finished layer kept; None: all

    def cut(self, layer_idx: int) -> dict[str, Any]:
        """What ``PolicyLayer.append`` needs to store layer ``layer_idx``'s keys at their true positions."""
        layout = self.layout
        if layer_idx == 0 or not self.running:
            return {}
        if layout.layer != layer_idx:
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"decoder layer {layer_idx} ran without kvpolicy cutting its inputs (its forward bypasses the "
                "adapter's decoder-layer class); use prefill_mode='cache_only'"
            )
        return {} if layout.pos is None else {"positions": layout.pos, "width": layout.width}

    def query_positions(self) -> torch.Tensor | None:
        """Absolute positions ``[B, q]`` of the current queries (-1: a surplus slot); None while all are there."""
        return self.layout.pos if self.running else None

    def layer_done(self, kept_positions: torch.Tensor | None) -> None:
        """Layer finished (compressed): ``kept_positions`` ``[B, H, L]``, or None when it holds every token."""
        self._kept = kept_positions

    def enter(self, decoder_layer: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Cut decoder layer ``l``'s inputs to the tokens layer ``l - 1`` kept; returns them, and whether
        this is the model's last decoder layer (the prefill then ends)."""
        idx, config = self.adapter.layer_index(decoder_layer)
        layout = self.layout
        if idx is None or config is not self.config or idx == 0:
            return inputs, False
        layout.layer = idx
        index = None
        pos = self._kept
        if pos is not None:  # layer idx-1 was given or kept a subset: the next layer gets its kept tokens
            if not bool((pos == pos[:, :1]).all()):
                from .errors import CacheMisuseError

                raise CacheMisuseError(
                    "prefill_mode='prune_hidden' needs every KV head of a layer to keep the same tokens "
                    "(this policy kept different ones per head); use head_aggregation='layer'"
                )
            kept, dense = kept_layout(pos[:, 0], layout.width)
            if layout.pos is None or not torch.equal(kept, layout.pos):
                index = hidden_index(layout.pos, kept, layout.width)
                layout.pos, layout.memo, layout.dense = kept, {}, dense
        if layout.pos is not None:
            inputs = self.adapter.slice_layer_inputs(inputs, index, layout)
        return inputs, idx == self.num_layers - 1


class PrunedPrefill:
    """A cache's prune-hidden prefill: started at the prompt's first layer, told what each layer kept,
    stopped after the model's last decoder layer (or by a reset)."""

    def __init__(self) -> None:
        self.pruner: HiddenPruner | None = None
        self.cuts: list[bool] = []  # per layer: whether its kept tokens are the next layer's inputs

    def begin(self, adapter: Any, config: Any, num_layers: int, module: Any, width: int, policy: Any) -> None:
        """A prompt's forward of ``width`` columns starts (``module``: its first attention module); the
        layers where ``policy.cuts_hidden_after`` holds pass on only their kept tokens."""
        install(adapter.decoder_layer_class(module))
        stop(self.pruner)
        self.cuts = [policy.cuts_hidden_after(idx) for idx in range(num_layers)]
        self.pruner = start(HiddenPruner(adapter, config, num_layers, width))

    @property
    def running(self) -> HiddenPruner | None:
        pruner = self.pruner
        return pruner if pruner is not None and pruner.running else None

    def cut(self, layer_idx: int) -> dict[str, Any]:
        """What the layer's ``append`` needs to store ``layer_idx``'s keys at their true positions."""
        pruner = self.running
        return {} if pruner is None else pruner.cut(layer_idx)

    def query_positions(self) -> torch.Tensor | None:
        pruner = self.running
        return None if pruner is None else pruner.query_positions()

    def mask(self, layer: Any, q: int, model_mask: Any, impl: str) -> Any:
        """The mask of ``layer``'s attention over its ``q`` new queries, for a layer whose slots no longer hold
        token ``i`` at slot ``i``: its own (:meth:`KVLayer.allowed`, one row for all heads in a cut layer), or
        ``model_mask`` itself (None: SDPA's causal kernel) where causal by slot is exact: a cut layer under SDPA
        holding just its queries' tokens (they ascend in position), every row as many (no surplus slot), no
        sliding window. SDPA's causal kernel skips the blocks above the diagonal, which a mask cannot, and
        needs no ``[B, 1, q, q]`` mask in memory."""
        pruner = self.running
        if pruner is not None and pruner.layout.pos is not None:  # per row; empty slots query as the last token
            layout = pruner.layout
            if (model_mask is None and impl == "sdpa" and layout.dense and layer.window is None
                    and layer.length == q):
                return model_mask
            return layer.allowed(layout.columns.view(layer.batch_size, 1, q, 1), True)
        return layer.allowed(layer.query_positions(q, layer.device).view(1, 1, q, 1), False)

    def layer_done(self, layer: Any) -> None:
        pruner = self.running
        if pruner is not None and self.cuts[layer.layer_idx]:  # what the next decoder layer's inputs are cut to
            # a copy: the cache may compact the layer in place next (freeing what left a sliding window)
            pruner.layer_done(None if layer.contiguous else layer.pos_view().clone())

    def stop(self) -> None:
        stop(self.pruner)
        self.pruner = None


def start(pruner: HiddenPruner) -> HiddenPruner:
    ACTIVE.set(weakref.ref(pruner))
    return pruner


def stop(pruner: HiddenPruner | None) -> None:
    if pruner is None or not pruner.running:
        return
    pruner.running = False
    ref = ACTIVE.get()
    if ref is not None and ref() in (pruner, None):
        ACTIVE.set(None)


def install(layer_cls: type) -> None:
    """Wrap ``layer_cls.forward`` (idempotent; stays for the life of the process)."""
    fn = layer_cls.__dict__.get("forward") or layer_cls.forward
    if getattr(fn, _MARK, False):
        return
    names = [
        p.name
        for p in list(inspect.signature(fn).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]

    @functools.wraps(fn)
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # no prefill is compiled, and reading the variable would break the graph
            return fn(self, *args, **kwargs)
        ref = ACTIVE.get()
        pruner = ref() if ref is not None else None
        if pruner is None or not pruner.running:
            return fn(self, *args, **kwargs)
        inputs = dict(zip(names, args), **kwargs)
        inputs, last = pruner.enter(self, inputs)
        try:
            return fn(self, **inputs)
        finally:
            if last:
                stop(pruner)

    setattr(forward, _MARK, True)
    layer_cls.forward = forward
