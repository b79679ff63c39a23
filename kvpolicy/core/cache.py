"""``PolicyCache``: a transformers ``Cache`` whose layers keep what a ``CachePolicy`` chooses.

Flow for one layer in one forward: ``update`` appends the new keys/values to the layer and returns
what attention reads; the attention wrapper (``attention_hook``) then asks ``attention_mask`` for the
mask (the layer's own once it has been compressed, since transformers' mask assumes slot ``i`` holds
token ``i``), runs attention, and calls ``attention_done``, where the policy's signals are recorded and
its plan applied (``compressor.py``). Compressing *after* the layer's attention keeps the prompt's own
forward exact: every prompt token attends to the whole prompt, as with a full cache, and only later
tokens see the compressed cache.

The cache is a thin list of layers (``layers/``: the kind is chosen once, by ``layers.choose_kind``)
and the few collaborators that hold what is not one layer's: the model's facts (``binding.py``), the
policy's decisions (``compressor.py``), a prune-hidden prefill (``hidden_pruning.PrunedPrefill``) and a
scoring pass (``scoring_pass.ScoringPass``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import Cache

from . import attention_hook, compiled_step, decode_attention, hidden_pruning, model_call
from .binding import ModelBinding
from .compressor import MASKED_IMPLEMENTATIONS, Compressor
from .errors import CacheMisuseError, ConfigError
from .layers import FreezeSpec, KVCodec, KVLayer, LayerSpec, choose_codec, choose_kind
from .ownership import ForwardOwner
from .policy import CachePolicy
from .rows import Rows, concat_states
from .scoring_pass import ScoringPass

#: Settings of the cache itself (the rest of a ``PolicyCache(name, **settings)`` call configures the policy).
CACHE_SETTINGS = ("compiled_decode", "decode_reserve", "prefill_rows", "layer_kind", "kv_dtype", "decode_kernel",
                  "tp_group")


class PolicyCache(Cache):
    """A KV cache driven by a :class:`CachePolicy`; pass it as ``past_key_values`` to ``generate``.

    Example::

        cache = PolicyCache(make_policy("pyramidinfer"))
        model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        cache.kv_tokens_per_layer(); cache.memory_bytes()

    Decoding is compiled: on a GPU, ``generate`` compiles its decode step (CUDA graphs) for this
    cache as it does for transformers' static cache. After the prompt's forward every layer is
    frozen into a fixed-shape buffer (:class:`~kvpolicy.core.layers.FrozenLayer`) of
    ``kept + decode_reserve`` slots (fewer where the policy bounds its growth); a layer that fills
    up is re-sized by half again at least (the step re-compiles once per re-size: set
    ``decode_reserve`` to the tokens you generate to size the buffers once). Between steps the
    policy's plan runs eagerly, so the tokens kept are those of the eager path.
    ``compiled_decode``: None (default) freezes on a GPU only, True always (also on CPU, where the
    frozen step runs eagerly unless compiled), False never (every step eager, as ``DynamicCache``).
    ``prefill_rows``: run a prompt of a larger batch that many rows at a time (one ``generate`` call
    still: the peak holds one chunk's activations and keys; ``core/model_call.py``).
    ``layer_kind``: the class the layers are made as (see ``layers.choose_kind``); ``kv_dtype``: how
    kept keys/values are stored, ``"auto"`` (the model's dtype), ``"int8"`` or ``"fp8"`` (8-bit codes with
    a scale per vector: about half the bytes), ``"int4"`` (4-bit codes with a scale and minimum per 32 channels:
    0.31 of 16-bit; read by dequantize + SDPA) or a codec object (``layers/codecs.py``, docs/kv-dtype.md);
    ``decode_kernel``: what
    computes a compiled decode step's attention, ``"auto"`` (kvpolicy's Triton kernel over the stored codes where
    it applies, on CUDA; else dequantize + SDPA), ``"triton"`` (the kernel or an error) or ``"sdpa"``
    (``core/decode_attention.py``); ``tp_group``: the
    tensor-parallel process group where kvpolicy cannot find it (``core/parallel.py``).
    """

    def __init__(
        self,
        policy: CachePolicy | str | None = None,
        *,
        compiled_decode: bool | None = None,
        decode_reserve: int = 256,
        prefill_rows: int | None = None,
        layer_kind: type[KVLayer] | None = None,
        kv_dtype: str | KVCodec = "auto",
        decode_kernel: str = "auto",
        tp_group: Any = None,
        **overrides: Any,
    ):
        super().__init__(layers=[])
        if policy is None or isinstance(policy, str):
            from .registry import make_policy

            policy = make_policy(policy or "full", **overrides)
        elif overrides:
            raise TypeError("pass overrides either to the policy or to PolicyCache(name, **overrides), not both")
        if compiled_decode not in (None, True, False):
            raise ConfigError(f"compiled_decode takes None (on a GPU), True or False, not {compiled_decode!r}")
        if not isinstance(decode_reserve, int) or decode_reserve < 1:
            raise ConfigError(f"decode_reserve must be a positive number of tokens, got {decode_reserve!r}")
        self.policy: CachePolicy = policy
        if prefill_rows is not None and (not isinstance(prefill_rows, int) or prefill_rows < 1):
            raise ConfigError(f"prefill_rows takes a positive number of rows (None: all at once), not {prefill_rows!r}")
        self.compiled_decode, self.decode_reserve, self.prefill_rows = compiled_decode, decode_reserve, prefill_rows
        self.layer_kind, self.kv_dtype, self.tp_group = layer_kind, kv_dtype, tp_group
        self._kind, self._codec = choose_kind(layer_kind), choose_codec(kv_dtype)
        self.decode_kernel = decode_attention.check_setting(decode_kernel)
        compiled_step.install()
        if prefill_rows:
            model_call.install()
        self._start()

    def _start(self) -> None:
        """The state of an empty cache (``__init__`` and ``reset``)."""
        self.layers: list[KVLayer] = []
        self.rows = Rows()  # a new object on reset: the old one's tensor may be held by a compiled graph
        self.binding: ModelBinding | None = None  # the model's facts, from its first attention
        self.compressor = Compressor(self.policy, self.rows)
        self._pruned = hidden_pruning.PrunedPrefill()
        self._scoring = ScoringPass(self.policy.needs_scoring_pass)
        self._frozen = False  # the layers are the frozen kind (between compiled decode steps)
        self._stepping = False  # a compiled step (``compiled_step.CompiledStep``) is running
        self._pending = 0  # tokens compiled steps appended that the host has not counted yet
        self._owner = ForwardOwner()  # the thread whose forward fills the cache

    # ----------------------------------------------------------------- per-row facts
    @property
    def pad(self) -> torch.Tensor | None:
        """Left padding per row ``[B]`` (on the device)."""
        return self.rows.pad

    @property
    def pad_host(self) -> list[int] | None:
        return self.rows.pad_host

    @property
    def prompt_len(self) -> list[int] | None:
        """Real prompt tokens per row, once the prompt's forward is done."""
        return self.rows.prompt_len

    @property
    def is_compileable(self) -> bool:
        """What ``generate`` asks before compiling its decode step (and before building its masks
        outside the forward, which it does for compileable caches)."""
        if self.compiled_decode is None:
            return torch.cuda.is_available()
        return self.compiled_decode

    # ----------------------------------------------------------------- Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        q = key_states.shape[2]
        if self._frozen:
            if q == 1:
                if not torch.compiler.is_compiling() and not self._stepping:
                    self._owner.enter(layer_idx, self.binding.num_layers)
                    # an eager decode step over the frozen layers, not begun by CompiledStep: begin it here,
                    # and route this layer's attention through the note (as the dynamic path does)
                    if layer_idx == 0:
                        self.begin_step()
                    attention_hook.PENDING.set(attention_hook.Pending(self, layer_idx))
                return self.layers[layer_idx].append(key_states, value_states)
            self.thaw()
        check_new_tokens(q, self)
        self._owner.enter(layer_idx, None if self.binding is None else self.binding.num_layers)
        attention_hook.check_consumed(new_forward=layer_idx == 0)
        if not self.layers:
            attention_hook.install()
        while len(self.layers) <= layer_idx:
            idx = len(self.layers)
            spec = LayerSpec(idx, self.rows, self.policy.headroom(idx), self.policy.signals.accumulated_attention,
                             self._codec, self.decode_kernel, self.compressor.recording)
            self.layers.append(self._kind(spec))
        keys, values = self.layers[layer_idx].append(key_states, value_states, **self._pruned.cut(layer_idx))
        attention_hook.PENDING.set(attention_hook.Pending(self, layer_idx))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """True number of tokens seen (pads included, as transformers counts), not tokens kept."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].total_seen + self._pending

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        check_new_tokens(query_length, self)
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        if layer_idx >= len(self.layers):
            return q, 0
        if q == 1 and self._frozen:
            # the frozen layers replace transformers' mask with their own: keep its shape constant, so a
            # compiled step's inputs do not change shape from one step to the next
            return 1, 0
        return self.layers[layer_idx].total_seen + self._pending + q, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers < 5.3
        return -1

    @property
    def max_batch_size(self) -> int:
        return self.rows.count

    @property
    def batch_size(self) -> int:
        return self.max_batch_size

    def activate_past_recording(self, **kwargs: Any) -> None:
        """transformers' notice of rollbacks to come (assisted decoding, before the prompt's forward): every layer,
        those made later too, keeps what leaves a sliding window until the next ``crop``."""
        self.compressor.recording = True
        super().activate_past_recording(**kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' rollback of the newest tokens (assisted decoding); then, as its sliding layers do, what
        fell out of a sliding window goes, also where ``activate_past_recording`` kept it until now."""
        super().crop(tokens_to_remove)
        self.compressor.free_out_of_window(self.layers, self.binding, force=tokens_to_remove != 0, cropped=True)

    def reset(self) -> None:
        """Empty the cache so it can serve a new prompt (or another model)."""
        self._pruned.stop()
        for layer in self.layers:
            layer.reset()
        self._start()

    def _move_rows(self, fn) -> None:
        """Re-index every per-row record: the layers, padding, prompt lengths, and the values the
        policy marked per-row (:class:`~kvpolicy.core.rows.PerRow`) in its layer state."""
        self._settle()
        for layer in self.layers:
            layer.move_rows(fn)
        self.rows.reindex(fn, self.compressor.states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._move_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._move_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._move_rows(lambda t: t[indices.to(t.device)])

    # ----------------------------------------------------------------- reporting
    def kv_tokens_per_layer(self) -> list[int]:
        """Slots in use per layer (the largest row; rows with fewer valid tokens have masked slots)."""
        self._settle()
        return [layer.length for layer in self.layers]

    def valid_tokens_per_layer(self) -> list[list[int]]:
        """Valid kept tokens per layer and row (the fullest head's, where a head-adaptive policy left the
        heads holding different counts)."""
        self._settle()
        return [[] if not layer.holds_tokens else layer.valid_counts() for layer in self.layers]

    def seen_tokens(self) -> list[int]:
        """Real (non-pad) tokens each row has given the cache, evicted ones included."""
        self._settle()
        return self.rows.seen(self.layers[0].total_seen) if self.layers else []

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Row-local positions ``[B, H_kv, L]`` kept in ``layer_idx`` (-1 for masked slots)."""
        self._settle()
        return self.layers[layer_idx].local_positions()

    def memory_bytes(self, allocated: bool = True) -> int:
        """Bytes of keys+values held (``allocated``: buffer capacity, else slots in use)."""
        return sum(self.memory_bytes_per_layer(allocated))

    def memory_bytes_per_layer(self, allocated: bool = True) -> list[int]:
        self._settle()
        return [layer.kv_bytes(allocated) for layer in self.layers]

    def signal_bytes(self) -> int:
        """Bytes of bookkeeping beside the KV (positions, query windows, scores)."""
        return sum(layer.signal_bytes() for layer in self.layers)

    # ----------------------------------------------------------------- compiled decoding
    def is_frozen(self) -> bool:
        """True while the layers are the frozen kind (between compiled decode steps)."""
        return self._frozen

    def enter_compiled_step(self, tokens: int) -> bool:
        """Called (by ``compiled_step.CompiledStep``) before a compiled forward of ``tokens`` per row:
        brings the frozen layers up to date; False if this forward is not a decode step over frozen
        layers (it then runs as an ordinary forward)."""
        if tokens != 1 or not self._frozen:
            return False
        self.begin_step()
        self._stepping = True
        return True

    def exit_compiled_step(self) -> None:
        self._stepping = False

    def begin_step(self) -> None:
        """Between decode steps (eager): count the last step's token, let the policy compress, and
        make room for the next token."""
        self._settle()
        for layer in self.layers:
            layer.make_room(lambda layer=layer: self.compressor.decode_growth(layer, self.binding, self.decode_reserve))
        self._pending = 1

    def attend(self, fn, impl: str, module: Any, query, key, value, args: tuple, kwargs: dict):
        """A compiled step's attention for ``module``'s layer (called by the attention wrapper)."""
        return self.layers[module.layer_idx].attend(fn, impl, module, query, key, value, args, kwargs)

    def start_decoding(self) -> None:
        """The prompt is in: freeze the layers for the compiled decode step, where this cache decodes so."""
        decodes_frozen = self.compiled_decode
        if decodes_frozen is None:
            decodes_frozen = self.layers[0].device.type == "cuda"
        if not decodes_frozen:
            return
        window, shared = self.policy.signals.decode_query_window, bool(self.policy.shared_positions)
        growth = [self.compressor.decode_growth(layer, self.binding, self.decode_reserve) for layer in self.layers]
        self.layers = [layer.to_frozen(FreezeSpec(layer.length + g, window, shared, g < self.decode_reserve))
                       for layer, g in zip(self.layers, growth)]
        torch._dynamo.mark_static_address(self.rows.pad)
        self._frozen = True

    def thaw(self) -> None:
        """Back to growing layers, for a forward of more than one token (a continued prompt)."""
        if self._frozen:
            self._settle()
            self.layers = [layer.to_dynamic() for layer in self.layers]
            self._frozen = False

    def _settle(self) -> None:
        """Account on the host for the tokens compiled steps appended, then let the policy compress
        (exactly what the eager path's plans would have seen after those tokens' attention)."""
        if not self._pending:
            return
        steps, self._pending = self._pending, 0
        for layer in self.layers:
            layer.settle(steps)
        self.compressor.after_compiled_steps(self.layers, self.binding, steps)

    # ----------------------------------------------------------------- attention hooks
    def attention_mask(self, layer_idx: int, module: Any, query: torch.Tensor, mask: Any, impl: str):
        """The mask this layer's attention must use: ``mask`` itself while slot ``i`` holds token ``i``,
        else the layer's own, boolean ``[B, H_kv or 1, Q, L]`` (one row per KV head, or one for all)."""
        layer = self.layers[layer_idx]
        if self.binding is None:
            self.binding = ModelBinding.bind(module, self.policy, layer.kv_heads, self.tp_group)
        facts = self.binding.meet(layer_idx, module)
        if facts is not None:
            layer.attach(facts)
        if self.rows.pad is None:
            self.rows.read_padding(mask, query.shape[0], query.device)
        if layer_idx == 0 and self.prompt_len is None and self.policy.prunes_hidden_states:
            b = self.binding
            self._pruned.begin(b.adapter, b.config, b.num_layers, module, layer.total_seen, self.policy)
        if layer.contiguous:
            return mask
        check_masked_implementation(impl)
        return self._pruned.mask(layer, query.shape[2], mask, impl)

    def attention_done(self, layer_idx: int, module: Any, query: torch.Tensor) -> None:
        """After the layer's attention: the policy's signals and plan, and after the last layer of a
        prompt, the freeze for decoding."""
        layer, chunk = self.layers[layer_idx], self._scoring.chunk
        if chunk is not None:  # a scoring pass's forward: the policy scores, nothing else happens
            if layer.compressible:
                self.policy.score(self.compressor.view(layer, self.binding, query.shape[2], True), query, chunk)
            return
        if layer.compressible:
            qpos = self._pruned.query_positions()
            self.compressor.after_attention(layer, self.binding, query, qpos, self._scoring.defers_plans)
        self._pruned.layer_done(layer)
        layer.release_attended()
        if not self._scoring.defers_plans:  # what left a sliding window (a scoring pass frees it after its plans)
            self.compressor.free_out_of_window([layer], self.binding, force=query.shape[2] > 1)
        if (layer_idx == self.binding.num_layers - 1 and self.prompt_len is not None
                and not self._scoring.prompt_running):  # a scoring pass comes first (it freezes when done)
            self.start_decoding()

    # ----------------------------------------------------------------- scoring pass
    def begin_scoring_pass(self) -> bool:
        """Asked by the model-call wrapper (``core/model_call.py``) before a forward: True when this is a
        fresh cache whose policy scores the prompt with a second forward; the pass then follows the forward."""
        return self._scoring.begin(cache_is_empty=not self.layers)

    def run_scoring_pass(self, model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None) -> None:
        self._scoring.run(self, model, input_ids, attention_mask, position_ids)

    # ----------------------------------------------------------------- row chunks
    def copy(self) -> PolicyCache:
        """An independent copy of this cache, its kept keys and values and its policy's state included.

        Compress once, ask many: fill a cache with a context alone (``kvpolicy.prefill`` or a forward),
        then give each question its own copy to continue, since ``generate`` appends to the cache it is
        given::

            kvpolicy.prefill(model, context_ids, context_mask, cache)
            for question in questions:
                ids = torch.cat([context_ids, question], 1)
                model.generate(input_ids=ids, **{kvpolicy.cache_argument(model): cache.copy()}, ...)
        """
        self._settle()
        return copy.deepcopy(self)

    def empty_copy(self, **settings: Any) -> PolicyCache:
        """A new, empty cache with a copy of this one's policy and settings (``settings`` override them)."""
        kwargs = {name: getattr(self, name) for name in CACHE_SETTINGS} | settings
        return PolicyCache(copy.deepcopy(self.policy), **kwargs)

    def adopt(self, chunks: list[PolicyCache]) -> None:
        """Become the concatenation of ``chunks``: caches of row chunks of one left-padded batch, each
        through the same prompt forward (see :func:`kvpolicy.prefill`). Their buffers are released
        layer by layer, so the peak is about one layer more than the chunks."""
        if self.layers:
            raise CacheMisuseError("adopt() fills an empty cache; call reset() first")
        first = chunks[0]
        if any(c.policy.describe() != first.policy.describe() for c in chunks):
            raise CacheMisuseError("the row chunks were made with different policies")
        if any(c.prompt_len is None or len(c.layers) != len(first.layers) for c in chunks):
            raise CacheMisuseError("adopt() takes caches that have been through one prompt forward")
        self.binding, self._scoring = first.binding, first._scoring
        self.policy.setup(first.binding.num_layers, first.binding.compressible)
        self.rows.pad = torch.cat([c.rows.pad for c in chunks])
        self.rows.pad_host = [p for c in chunks for p in c.rows.pad_host]
        self.rows.prompt_len = [n for c in chunks for n in c.rows.prompt_len]
        self.compressor.states = concat_states([c.compressor.states for c in chunks])
        for idx in range(len(first.layers)):
            self.layers.append(self._kind.concat([c.layers[idx] for c in chunks], self.rows))
        self.start_decoding()


def check_masked_implementation(impl: str) -> None:
    """Refuse an attention implementation that takes no arbitrary mask, which a layer whose slot ``i`` no longer
    holds token ``i`` needs (a compressed layer, or a sliding one freed of what fell out of its window)."""
    if impl not in MASKED_IMPLEMENTATIONS:
        raise CacheMisuseError(
            f"attention implementation {impl!r} cannot attend over a compressed layer; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )


def check_new_tokens(query_length, cache: PolicyCache) -> None:
    """Refuse a forward of no new tokens, before the model fails on it with a reshape error.

    Called from ``get_mask_sizes`` (transformers asks it for the mask before any decoder layer
    runs, so this is the cache's first sight of a forward) and from ``update``. With tokens
    already cached, zero new tokens means the cache is being reused for a new, shorter prompt:
    ``generate`` treats a filled cache as the start of its input and passes on only the tokens
    past the cached length, which leaves none. (A reset cannot be done for the user here: the
    prompt's tokens are already cut away, and a longer input is indistinguishable from a
    continuation of the cached tokens, which transformers supports.)
    """
    q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
    if q > 0:
        return
    held = cache.get_seq_length()
    if held:
        raise CacheMisuseError(
            f"this cache already holds {held} tokens per row and was given no new ones: generate treats a filled "
            "cache as the start of its input and runs only what lies beyond it, and this prompt is too short to "
            "reach beyond it (a longer one would silently continue the cached tokens instead). A cache serves "
            "one prompt: use a new cache per generate call or call cache.reset() before reusing it"
        )
    raise CacheMisuseError(
        "the prompt is empty (input_ids of shape [batch, 0]): there is nothing to prefill. Pass at least one "
        "token per row (e.g. the tokenizer's BOS token, or a chat template's header)"
    )


def make_cache(name_or_config: Any = "full", **overrides: Any) -> PolicyCache:
    """``make_cache("pyramidinfer", prefill_decay_ratio=0.8)`` or ``make_cache(config)``: a
    :class:`PolicyCache` with the named (or configured) policy, settings validated; the cache's own
    settings (``compiled_decode``, ``decode_reserve``, ``prefill_rows``, ``layer_kind``, ``kv_dtype``,
    ``decode_kernel``, ``tp_group``) may be passed too, and a config dict or preset file may hold them beside
    the policy's (``kv_dtype: int8`` in a preset); a keyword wins over the config's."""
    from .registry import make_policy, preset_config

    config, settings = preset_config(name_or_config), {}
    if isinstance(config, dict):  # read once: the policy is made from the same dict
        settings = {k: config[k] for k in CACHE_SETTINGS if k in config}
        config = {k: v for k, v in config.items() if k not in CACHE_SETTINGS}
    settings |= {k: overrides.pop(k) for k in CACHE_SETTINGS if k in overrides}
    return PolicyCache(make_policy(config, **overrides), **settings)
