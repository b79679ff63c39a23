"""Greedy decoding for throughput: row-chunked prefill, then a compiled, static-shaped decode step.

``model.generate(past_key_values=PolicyCache(...))`` runs every step eagerly, and on a large
model the per-step launch overhead then costs more than the memory a compressed cache saves
(docs/benchmarks/throughput.md). :func:`generate_static` removes both limits:

* the prompt batch is prefilled in chunks of ``prefill_batch_size`` rows, each through an
  ordinary :class:`~kvpolicy.PolicyCache`, so prefill's full-length activations and keys no
  longer cap the batch — the compressed cache does;
* the chunks are frozen into one :class:`~kvpolicy.core.static_decode.StaticPolicyCache`,
  and each decode step is one ``torch.compile``-d forward (CUDA graphs with the default
  ``mode="reduce-overhead"``); the policy's re-compression runs eagerly between steps.

The tokens are those of greedy ``generate`` with the same policy (tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .core import attention_hook
from .core.cache import PolicyCache, make_cache
from .core.compat import cache_argument, takes_cache_position
from .core.errors import ConfigError
from .core.static_decode import StaticPolicyCache


@dataclass
class StaticGeneration:
    """``sequences``: prompt and generated tokens, as ``generate`` returns them; ``cache``: the
    static cache at the end (for ``memory_bytes()``, ``kv_tokens_per_layer()``, ...); ``logits``
    (with ``output_logits=True``): each generated token's logits, ``[B, V]`` float32 per step, as
    ``generate(..., output_logits=True, return_dict_in_generate=True).logits`` holds them."""

    sequences: torch.Tensor
    cache: StaticPolicyCache
    prefill_seconds: float = 0.0  #: wall time until the frozen cache was ready (device synchronised)
    logits: tuple[torch.Tensor, ...] | None = None


_COMPILED: dict[tuple, Callable] = {}


def _decode_step(model, cache_arg: str, cache, input_ids, position_ids, extra: dict[str, Any], mask):
    """One decode forward: the greedy tokens ``[B]`` and the step's logits ``[B, V]``. The logits are
    returned whether or not the caller keeps them, so ``output_logits`` runs the very graph that
    decoding without it runs (the lm_head's output is materialised for the argmax anyway)."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                **{cache_arg: cache}, **extra)
    logits = out.logits[:, -1]
    return logits.argmax(-1), logits


def _compiled_step(options: dict[str, Any] | None) -> Callable:
    if options is None:
        return _decode_step
    key = tuple(sorted(options.items()))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_decode_step, **options)
    return _COMPILED[key]


def _clock(profile: dict | None, device: torch.device) -> float:
    if profile is None:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _memory_mark(profile: dict | None, key: str, device: torch.device) -> None:
    """Peak memory of the phase that just ended, and what it left allocated (CUDA, with ``profile`` only)."""
    if profile is not None and device.type == "cuda":
        profile[key] = torch.cuda.max_memory_allocated(device)
        profile[key.replace("peak_", "held_after_")] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)


def generate_static(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    policy: str | Callable[[], PolicyCache] = "full",
    max_new_tokens: int,
    prefill_batch_size: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    compile: bool | dict[str, Any] = True,
    profile: dict[str, float] | None = None,
    output_logits: bool = False,
    **policy_overrides: Any,
) -> StaticGeneration:
    """Greedy generation of ``max_new_tokens`` per row with ``policy`` (a name/preset, or a
    factory returning a fresh :class:`PolicyCache`), decoding through a static cache.

    ``compile``: ``True`` compiles the step with ``fullgraph=True`` (and ``mode="reduce-overhead"``,
    i.e. CUDA graphs, on a GPU); a dict gives other ``torch.compile`` options; ``False`` runs the same
    static step eagerly. ``eos_token_id``: rows that emit it are padded with ``pad_token_id``
    from then on, and generation ends when every row has. ``profile``: a dict to fill with the
    seconds spent in compiled steps (``step_s``) and in the eager re-compression between them
    (``maintain_s``), synchronising the device around each, and on CUDA the peak memory of
    prefill, freeze and decode (slower, and it resets the peak counter; for breakdowns only).
    ``output_logits``: keep each generated token's logits in ``StaticGeneration.logits`` (a float32
    copy of ``[B, V]`` per step, as ``generate``'s ``output_logits=True`` does; for checks, it costs
    memory and a copy per step).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = input_ids.shape[0]
    chunk = prefill_batch_size or batch
    if chunk < 1:
        raise ConfigError(f"prefill_batch_size must be at least 1, got {prefill_batch_size}")
    if callable(policy) and policy_overrides:
        raise TypeError("pass settings either to your cache factory or as keyword overrides of a policy name, not both")
    factory = policy if callable(policy) else (lambda: make_cache(policy, **policy_overrides))
    cache_arg, takes_position = cache_argument(model), takes_cache_position(model)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    _memory_mark(profile, "peak_before_bytes", input_ids.device)
    started = time.perf_counter()
    caches, first, first_logits = [], [], []
    with torch.no_grad():
        for start in range(0, batch, chunk):
            rows = slice(start, start + chunk)
            cache = factory()
            out = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], position_ids=positions[rows],
                        use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            first.append(out.logits[:, -1].argmax(-1))
            if output_logits:
                first_logits.append(out.logits[:, -1].to(copy=True, dtype=torch.float32))
            caches.append(cache)
            del out
        _memory_mark(profile, "peak_prefill_bytes", input_ids.device)
        static = StaticPolicyCache.freeze(caches, max_new_tokens - 1, consume=True)
        del caches, cache  # the chunks' buffers are copied: free them before decoding
        _memory_mark(profile, "peak_freeze_bytes", input_ids.device)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        prefill_seconds = time.perf_counter() - started
        tokens = [torch.cat(first)]
        logits = [torch.cat(first_logits)] if output_logits else None
        if compile is True:  # CUDA graphs where they exist; on CPU reduce-overhead only slows inductor down
            compile = {"fullgraph": True, **({"mode": "reduce-overhead"} if input_ids.device.type == "cuda" else {})}
        options = None if compile is False else compile
        step = _compiled_step(options)
        next_pos = attention_mask.long().sum(-1, keepdim=True)
        mask = torch.ones(batch, 1, 1, 1, dtype=torch.bool, device=input_ids.device)  # replaced per layer
        base_abs = static.abs_pos.clone()
        unfinished = None if eos_token_id is None else tokens[0] != eos_token_id
        attention_hook.STATIC_CACHE = static
        try:
            for i in range(max_new_tokens - 1):
                if unfinished is not None and i % 8 == 0 and not bool(unfinished.any()):
                    break
                extra = {"cache_position": base_abs + i} if takes_position else {}
                if options is not None and options.get("mode") == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                t0 = _clock(profile, input_ids.device)
                tok, step_logits = step(model, cache_arg, static, tokens[-1][:, None], next_pos + i, extra, mask)
                tok = tok.clone()  # copied before the next replay of a CUDA graph overwrites its outputs
                if output_logits:
                    logits.append(step_logits.to(copy=True, dtype=torch.float32))
                if unfinished is not None:
                    tok = torch.where(unfinished, tok, torch.full_like(tok, pad_token_id))
                    unfinished = unfinished & (tok != eos_token_id)
                tokens.append(tok)
                t1 = _clock(profile, input_ids.device)
                static.advance(another_step=i < max_new_tokens - 2)
                if profile is not None:
                    t2 = _clock(profile, input_ids.device)
                    profile["step_s"] = profile.get("step_s", 0.0) + t1 - t0
                    profile["maintain_s"] = profile.get("maintain_s", 0.0) + t2 - t1
                    profile["steps"] = profile.get("steps", 0) + 1
        finally:
            attention_hook.STATIC_CACHE = None
        _memory_mark(profile, "peak_decode_bytes", input_ids.device)
    generated = torch.stack(tokens, dim=1)
    if eos_token_id is not None:  # as generate: stop after the step where the last row ended
        hit = generated == eos_token_id
        if bool(hit.any(1).all()):
            generated = generated[:, : int(hit.float().argmax(1).max()) + 1]
    if logits is not None:
        logits = tuple(logits[: generated.shape[1]])
    return StaticGeneration(torch.cat([input_ids, generated], dim=1), static, prefill_seconds, logits)
