"""Per-row facts every layer of a cache shares: left padding and prompt lengths.

Why one small object: a layer needs each row's padding to tell valid slots from pads, and
the cache learns it once per prompt (from the model's mask). Handing layers this object,
rather than a reference back to their cache, keeps a layer self-contained (transformers'
shape: a cache is a thin list of layers) and the core free of import cycles.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class PerRow(list):
    """A value with one entry per batch row, kept in a policy's layer state.

    The cache re-indexes these (and only these) when rows move: beam search's reorder,
    ``num_return_sequences``' repeat, dropping finished rows, merging prefill chunks.
    """


@dataclass
class Rows:
    """``pad``: left padding per row ``[B]`` on the cache's device (fixed address once decoding is
    compiled); ``pad_host``: the same on the host, so per-row arithmetic needs no device read;
    ``prompt_len``: real prompt tokens per row, set when the prompt's forward is done."""

    pad: torch.Tensor | None = None
    pad_host: list[int] | None = None
    prompt_len: list[int] | None = None
    _seen_memo: tuple | None = field(default=None, repr=False, compare=False)

    def clear(self) -> None:
        self.pad = self.pad_host = self.prompt_len = None

    @property
    def count(self) -> int:
        return -1 if self.pad_host is None else len(self.pad_host)

    def seen(self, total_seen: int) -> list[int]:
        """Real (non-pad) tokens each row has given a layer that was given ``total_seen`` columns.
        (Every layer asks with the same number at each step: the last answer is kept; callers must
        not modify it.)"""
        memo = self._seen_memo
        if memo is None or memo[0] != total_seen or memo[1] is not self.pad_host:
            memo = self._seen_memo = (total_seen, self.pad_host, [total_seen - p for p in self.pad_host])
        return memo[2]

    def local(self, pos: torch.Tensor) -> torch.Tensor:
        """Row-local positions of absolute slot positions ``pos`` ``[B, H, L]``; -1 for pads and empty slots."""
        pad = self.pad.view(-1, 1, 1)
        return torch.where(pos >= pad, pos - pad, torch.full_like(pos, -1))

    def valid(self, pos: torch.Tensor) -> torch.Tensor:
        return pos >= self.pad.view(-1, 1, 1)

    def read_padding(self, mask: Any, batch: int, device: torch.device) -> None:
        """Learn each row's left padding from the model's attention mask (the prompt's first forward)."""
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
            self.pad, self.pad_host = torch.zeros(batch, dtype=torch.long, device=device), [0] * batch
        else:
            # 4-D: each query's own column, masked only for a pad (the last query row also hides the columns
            # before a sliding window, and the first layer may be sliding: Gemma 2/3, Mistral); 2-D: flash
            # attention's padding mask
            last = mask[:, 0].diagonal(mask.shape[-1] - mask.shape[-2], -2, -1) if mask.dim() == 4 else mask
            if last.dtype == torch.bool:
                valid = last
            elif last.is_floating_point():  # additive mask: 0 attends, a large negative does not
                valid = last > torch.finfo(last.dtype).min / 2
            else:
                valid = last != 0
            if valid.shape[0] != batch:
                valid = valid.expand(batch, -1)
            self.pad = (valid.long().cumsum(-1) == 0).sum(-1).to(device)
            self.pad_host = self.pad.tolist()  # the forward's one read of the device for the cache
        self.prompt_len = None

    def reindex(self, fn: Callable[[torch.Tensor], torch.Tensor], states: dict[int, Any]) -> None:
        """Move rows: ``fn`` maps a ``[B, ...]`` tensor to the new rows (index_select, repeat, ...).
        The device tensor is rewritten in place when the batch keeps its size (its address may be
        captured by a compiled step)."""
        if self.pad is None:
            return
        order = fn(torch.arange(len(self.pad_host))).tolist()
        moved = fn(self.pad)
        if moved.shape == self.pad.shape:
            self.pad.copy_(moved)
        else:
            self.pad = moved
        self.pad_host = [self.pad_host[i] for i in order]
        if self.prompt_len is not None:
            self.prompt_len = [self.prompt_len[i] for i in order]
        for state in states.values():
            for name in _per_row_fields(state):
                setattr(state, name, PerRow(getattr(state, name)[i] for i in order))


def concat_states(states: list[dict[int, Any]]) -> dict[int, Any]:
    """The policies' layer states of row chunks of one batch, as one: per-row values joined in row
    order, everything else taken from the first chunk."""
    merged: dict[int, Any] = {}
    for layer_idx, first in states[0].items():
        joined = {name: PerRow(x for s in states for x in getattr(s[layer_idx], name))
                  for name in _per_row_fields(first)}
        merged[layer_idx] = dataclasses.replace(first, **joined) if joined else copy.copy(first)
    return merged


def _per_row_fields(state: Any) -> list[str]:
    """The fields of a policy's layer state (a dataclass, or None) that hold a :class:`PerRow` value."""
    if state is None:
        return []
    if not dataclasses.is_dataclass(state):
        raise TypeError(
            f"a policy's layer state must be a dataclass instance (or None), not {type(state).__name__}: "
            "return one from CachePolicy.new_layer_state()"
        )
    return [f.name for f in dataclasses.fields(state) if isinstance(getattr(state, f.name), PerRow)]
