"""Timing and memory bookkeeping for one cache's life: prefill, decode, and what it holds.

Why a separate module: every task (scoring, needle, generation) must measure the same things
the same way, or the per-policy numbers in ``compare`` would not be comparable. A task runs
its forwards through :class:`Meter`, which records one :class:`SequenceStats` per cache.

Peak memory: on CUDA the runner reads ``torch.cuda.max_memory_allocated`` (weights and
activations included). Elsewhere there is no cheap allocator-level peak for torch tensors
(``tracemalloc`` does not see them and RSS is dominated by the model), so the peak reported
is the largest ``cache.memory_bytes(allocated=True) + cache.signal_bytes()`` sampled after
prefill and after every decode step: the cache's own peak footprint, buffers and policy
bookkeeping included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..core.compat import cache_argument


@dataclass
class SequenceStats:
    """What one cache (one prefill + its decoding) cost."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0
    kv_bytes_prefill: int = 0
    kv_bytes_end: int = 0
    kv_bytes_allocated_end: int = 0
    peak_cache_bytes: int = 0
    layer_tokens_prefill: list[int] = field(default_factory=list)
    layer_tokens_end: list[int] = field(default_factory=list)


def _cache_footprint(cache: Any) -> int:
    signal = getattr(cache, "signal_bytes", None)
    return cache.memory_bytes(allocated=True) + (signal() if signal else 0)


class Meter:
    """Runs timed forwards/generations and keeps one :class:`SequenceStats` per cache."""

    def __init__(self) -> None:
        self.sequences: list[SequenceStats] = []

    # ------------------------------------------------------------------ snapshots
    def _after_prefill(self, stats: SequenceStats, cache: Any) -> None:
        stats.kv_bytes_prefill = cache.memory_bytes(allocated=False)
        stats.layer_tokens_prefill = list(cache.kv_tokens_per_layer())
        stats.peak_cache_bytes = max(stats.peak_cache_bytes, _cache_footprint(cache))

    def _at_end(self, stats: SequenceStats, cache: Any) -> None:
        stats.kv_bytes_end = cache.memory_bytes(allocated=False)
        stats.kv_bytes_allocated_end = cache.memory_bytes(allocated=True)
        stats.layer_tokens_end = list(cache.kv_tokens_per_layer())
        stats.peak_cache_bytes = max(stats.peak_cache_bytes, _cache_footprint(cache))
        self.sequences.append(stats)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self, model: Any, inputs: dict[str, torch.Tensor], cache: Any, new_tokens: int, pad_id: int,
        context: dict[str, torch.Tensor] | None = None, *, stop_at_eos: bool = False, prefill_rows: int | None = None,
    ) -> torch.Tensor:
        """Greedy ``generate`` of ``new_tokens`` tokens; returns them ``[B, new_tokens]`` (fewer columns
        when ``stop_at_eos`` and every row ended its answer early; finished rows are padded with ``pad_id``).

        Prefill time is the time to the first logits; the rest is decode (``new_tokens - 1``
        forwards per row), read by a logits processor that also samples the cache's footprint.
        ``context``: the leading columns of ``inputs``, run through the cache first on their own (the
        policy compresses them without seeing the rest, the question), timed as part of prefill;
        ``generate`` then continues the cache with the remaining columns.
        ``stop_at_eos``: let rows end at the model's end-of-turn token (as an evaluation that scores
        the answer text wants) instead of forcing exactly ``new_tokens``.
        ``prefill_rows``: run the prompt's (or the context's) forward this many rows at a time
        (:func:`kvpolicy.prefill`), so a large batch's prefill activations need not fit at once.
        """
        from ..generation import prefill

        stats = SequenceStats(prefill_tokens=int(inputs["attention_mask"].sum()))
        before = 0.0
        first: torch.Tensor | None = None  # the first generated token, when the prefill ran here
        if context is not None:
            width = context["input_ids"].shape[1]
            if not torch.equal(inputs["input_ids"][:, :width], context["input_ids"]):
                raise ValueError("context must be the leading columns of inputs")
            start = time.perf_counter()
            prefill(model, context["input_ids"], context["attention_mask"], cache, prefill_rows)
            before = time.perf_counter() - start
        elif prefill_rows is not None and prefill_rows < inputs["input_ids"].shape[0]:
            start = time.perf_counter()
            logits = prefill(model, inputs["input_ids"], inputs["attention_mask"], cache, prefill_rows)
            first = logits.argmax(-1, keepdim=True)
            inputs = {"input_ids": torch.cat([inputs["input_ids"], first], 1),
                      "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(first)], 1)}
            before = time.perf_counter() - start
            new_tokens -= 1
        meter = self

        class _Clock(LogitsProcessor):
            calls = 0
            first = 0.0

            def __call__(self, input_ids, scores):
                if self.calls == 0:
                    self.first = time.perf_counter()
                    meter._after_prefill(stats, cache)
                else:
                    stats.peak_cache_bytes = max(stats.peak_cache_bytes, _cache_footprint(cache))
                self.calls += 1
                return scores

        clock = _Clock()
        start = time.perf_counter()
        out = inputs["input_ids"]
        if new_tokens > 0:
            out = model.generate(
                **inputs,
                **{cache_argument(model): cache},
                max_new_tokens=new_tokens,
                **({} if stop_at_eos else {"min_new_tokens": new_tokens}),
                do_sample=False,
                pad_token_id=pad_id,
                logits_processor=LogitsProcessorList([clock]),
            )
        end = time.perf_counter()
        clock.first = clock.first or end
        stats.prefill_s = before + clock.first - start
        stats.decode_s = end - clock.first
        stats.decode_tokens = max(0, clock.calls - 1) * inputs["input_ids"].shape[0]
        if clock.calls == 0:
            self._after_prefill(stats, cache)
        self._at_end(stats, cache)
        width = inputs["input_ids"].shape[1] - (first.shape[1] if first is not None else 0)
        return out[:, width:]

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, model: Any, ids: torch.Tensor, prefix: int, step: int, cache: Any) -> tuple[float, int]:
        """Sum of next-token NLL over ``ids[:, prefix+1:]`` and its count.

        The first ``prefix`` tokens are one prefill (the policy compresses them); the rest go
        through the cache ``step`` tokens per forward, so each scored token sees only what the
        policy kept. The prefill's own last logits are not scored: they see the full prompt
        under every policy.
        """
        stats = SequenceStats(prefill_tokens=ids.shape[0] * prefix)
        start = time.perf_counter()
        model(input_ids=ids[:, :prefix], use_cache=True, **{cache_argument(model): cache})
        stats.prefill_s = time.perf_counter() - start
        self._after_prefill(stats, cache)
        nll, count = 0.0, 0
        length = ids.shape[1]
        start = time.perf_counter()
        pos = prefix
        while pos < length - 1:
            chunk = ids[:, pos : min(pos + step, length - 1)]
            logits = model(input_ids=chunk, use_cache=True, **{cache_argument(model): cache}).logits.float()
            targets = ids[:, pos + 1 : pos + 1 + chunk.shape[1]]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
            stats.decode_tokens += chunk.numel()
            stats.peak_cache_bytes = max(stats.peak_cache_bytes, _cache_footprint(cache))
            pos += chunk.shape[1]
        stats.decode_s = time.perf_counter() - start
        self._at_end(stats, cache)
        return nll, count
