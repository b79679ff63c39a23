"""Row-chunked prefill, and a greedy decode loop for benchmarks and checks.

:func:`prefill` fills a cache chunk by chunk of rows, so prefill's full-length activations and
keys no longer cap the batch (the compressed cache does); ``model.generate`` then continues on
that cache, decoding through the compiled step (``core/compiled_step.py``).

:func:`generate_static` is a thin greedy loop over the same pieces: :func:`prefill`, then the
cache's frozen layers stepped by one ``torch.compile``-d forward per token (CUDA graphs with
``mode="reduce-overhead"`` on a GPU). It exists for measurements that need what ``generate``
does not give: per-phase timing and memory (``profile``) and a fully captured step. Its tokens
are those of greedy ``generate`` with the same policy (tested).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .compiled_parts import compiled_parts
from .core import model_call
from .core.attention_hook import FROZEN_CACHE
from .core.cache import PolicyCache, make_cache
from .core.compat import cache_argument, takes_cache_position
from .core.errors import CacheMisuseError, ConfigError


@dataclass
class StaticGeneration:
    """``sequences``: prompt and generated tokens, as ``generate`` returns them; ``cache``: the
    static cache at the end (for ``memory_bytes()``, ``kv_tokens_per_layer()``, ...); ``logits``
    (with ``output_logits=True``): each generated token's logits, ``[B, V]`` float32 per step, as
    ``generate(..., output_logits=True, return_dict_in_generate=True).logits`` holds them."""

    sequences: torch.Tensor
    cache: PolicyCache
    prefill_seconds: float = 0.0  #: wall time until the frozen cache was ready (device synchronised)
    logits: tuple[torch.Tensor, ...] | None = None


_COMPILED: dict[tuple, Callable] = {}


def _decode_step(model, cache_arg: str, cache, input_ids, position_ids, extra: dict[str, Any], mask):
    """One decode forward: the greedy tokens ``[B]`` and the step's logits ``[B, V]``. The logits are
    returned whether or not the caller keeps them, so ``output_logits`` runs the very graph that
    decoding without it runs (the lm_head's output is materialised for the argmax anyway)."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                **{cache_arg: cache, FROZEN_CACHE: cache}, **extra)
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


def prefill(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: PolicyCache,
    rows: int | None = None,
    compile: bool | dict[str, Any] = False,
) -> torch.Tensor:
    """Run the prompt through ``model`` into ``cache``, ``rows`` rows at a time; returns the last
    position's logits ``[B, V]``.

    ``compile``: run the forward's cache-free parts (MLP, norms, RoPE) compiled
    (:mod:`kvpolicy.compiled_parts`; a dict gives ``torch.compile`` options). Worth it for long
    prompts on a GPU, where those parts' elementwise passes cost about a quarter of a prefill;
    the first call compiles (seconds to a minute).

    Each chunk goes through its own cache with the same policy, and ``cache`` then adopts them
    all, so the peak holds one chunk's activations and full-length keys rather than the batch's.
    To generate so, give the cache the rows instead: ``model.generate(**inputs,
    cache=make_cache(name, prefill_rows=32))`` runs its prompt forward this way in the one call.
    """
    if cache.layers:
        raise CacheMisuseError("prefill() fills an empty cache; use a new one (or call cache.reset())")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise CacheMisuseError(f"prefill() takes input_ids as a [batch, tokens] tensor, got {shape}; for one "
                               "prompt use ids.unsqueeze(0), or the tokenizer's return_tensors='pt'")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise CacheMisuseError(
            f"prefill(): attention_mask has shape {list(attention_mask.shape)} but input_ids {list(input_ids.shape)}; "
            "they must match, one mask entry per token (1: a token, 0: left padding). Pass the mask the tokenizer "
            "returned with these ids (tokenizer(texts, padding=True, return_tensors='pt')), or attention_mask=None "
            "when no row is padded"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = input_ids.shape[0]
    rows = rows or batch
    if rows < 1:
        raise ConfigError(f"rows must be at least 1, got {rows}")
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                  logits_to_keep=1, **{cache_argument(model): cache})
    parts = contextlib.nullcontext() if compile is False else compiled_parts(
        model, None if compile is True else compile)
    with torch.no_grad(), parts:
        out = model(**inputs) if rows >= batch else model_call.forward_in_row_chunks(model, cache, rows, inputs)
    return out.logits[:, -1]


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
    compile_prefill: bool | dict[str, Any] = False,
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
    memory and a copy per step). ``compile_prefill``: :func:`prefill`'s ``compile``.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = input_ids.shape[0]
    if callable(policy) and policy_overrides:
        raise TypeError("pass settings either to your cache factory or as keyword overrides of a policy name, not both")
    cache = policy() if callable(policy) else make_cache(policy, **policy_overrides)
    cache.compiled_decode = True
    cache.decode_reserve = max(1, max_new_tokens - 1)  # the buffers hold the whole generation: no re-sizing
    cache_arg, takes_position = cache_argument(model), takes_cache_position(model)
    _memory_mark(profile, "peak_before_bytes", input_ids.device)
    started = time.perf_counter()
    with torch.no_grad():
        first_logits = prefill(model, input_ids, attention_mask, cache, prefill_batch_size, compile_prefill)
        _memory_mark(profile, "peak_prefill_bytes", input_ids.device)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        prefill_seconds = time.perf_counter() - started
        tokens = [first_logits.argmax(-1)]
        logits = [first_logits.float()] if output_logits else None
        if compile is True:  # CUDA graphs where they exist; on CPU reduce-overhead only slows inductor down
            compile = {"fullgraph": True, **({"mode": "reduce-overhead"} if input_ids.device.type == "cuda" else {})}
        options = None if compile is False else compile
        step = _compiled_step(options)
        next_pos = attention_mask.long().sum(-1, keepdim=True)
        mask = torch.ones(batch, 1, 1, 1, dtype=torch.bool, device=input_ids.device)  # replaced per layer
        base_abs = input_ids.shape[1]
        unfinished = None if eos_token_id is None else tokens[0] != eos_token_id
        for i in range(max_new_tokens - 1):
            if unfinished is not None and i % 8 == 0 and not bool(unfinished.any()):
                break
            position = torch.full((1,), base_abs + i, device=input_ids.device)
            extra = {"cache_position": position} if takes_position else {}
            t0 = _clock(profile, input_ids.device)
            if not cache.enter_compiled_step(1):
                raise CacheMisuseError("the cache did not freeze its layers after the prompt")  # pragma: no cover
            try:
                if options is not None and options.get("mode") == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                t1 = _clock(profile, input_ids.device)
                tok, step_logits = step(model, cache_arg, cache, tokens[-1][:, None], next_pos + i, extra, mask)
                tok = tok.clone()  # copied before the next replay of a CUDA graph overwrites its outputs
                if output_logits:
                    logits.append(step_logits.to(copy=True, dtype=torch.float32))
                if unfinished is not None:
                    tok = torch.where(unfinished, tok, torch.full_like(tok, pad_token_id))
                    unfinished = unfinished & (tok != eos_token_id)
                tokens.append(tok)
                t2 = _clock(profile, input_ids.device)
            finally:
                cache.exit_compiled_step()
            if profile is not None:
                profile["step_s"] = profile.get("step_s", 0.0) + t2 - t1
                profile["maintain_s"] = profile.get("maintain_s", 0.0) + t1 - t0
                profile["steps"] = profile.get("steps", 0) + 1
        cache.kv_tokens_per_layer()  # count the last step's token and let the policy compress, as generate would
        _memory_mark(profile, "peak_decode_bytes", input_ids.device)
    generated = torch.stack(tokens, dim=1)
    if eos_token_id is not None:  # as generate: stop after the step where the last row ended
        hit = generated == eos_token_id
        if bool(hit.any(1).all()):
            generated = generated[:, : int(hit.float().argmax(1).max()) + 1]
    if logits is not None:
        logits = tuple(logits[: generated.shape[1]])
    return StaticGeneration(torch.cat([input_ids, generated], dim=1), cache, prefill_seconds, logits)
