"""``PolicyCache``: a transformers ``Cache`` whose layers keep what a ``CachePolicy`` chooses.

Flow for one layer in one forward: ``update`` appends the new keys/values in place and
returns the layer's kept keys/values; the attention wrapper (``attention_hook``) then asks
``_before_attention`` for the mask (ours when the layer has been compressed, since
transformers' mask assumes slot ``i`` holds token ``i``), runs attention, and calls
``_after_attention``, where the policy's signals are updated and its plan applied.
Compressing *after* the layer's attention keeps the prompt's own forward exact: every
prompt token attends to the whole prompt, as with a full cache, and only later tokens see
the compressed cache.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache

from . import attention_hook, compiled_step, hidden_pruning, masks, parallel, scoring_pass
from .compat import cache_argument
from .errors import CacheMisuseError, ConfigError
from .layer_store import PolicyLayer, first_moved_slot
from .policy import CachePolicy, LayerView, Plan, ScoringChunk
from .rows import Rows, concat_states
from .selection import select_per_head_parallel, select_slots
from .static_layer import StaticPolicyLayer

#: Settings of the cache itself (the rest of a ``PolicyCache(name, **settings)`` call configures the policy).
CACHE_SETTINGS = ("compiled_decode", "decode_reserve")


class PolicyCache(Cache):
    """A KV cache driven by a :class:`CachePolicy`; pass it as ``past_key_values`` to ``generate``.

    Example::

        cache = PolicyCache(make_policy("pyramidinfer"))
        model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        cache.kv_tokens_per_layer(); cache.memory_bytes()

    Decoding is compiled: on a GPU, ``generate`` compiles its decode step (CUDA graphs) for this
    cache as it does for transformers' static cache. After the prompt's forward every layer is
    frozen into a fixed-shape buffer (:class:`~kvpolicy.core.static_layer.StaticPolicyLayer`) of
    ``kept + decode_reserve`` slots (fewer where the policy bounds its growth); a layer that fills
    up is re-sized by half again at least (the step re-compiles once per re-size: set
    ``decode_reserve`` to the tokens you generate to size the buffers once). Between steps the
    policy's plan runs eagerly, so the tokens kept are those of the eager path.
    ``compiled_decode``: None (default) freezes on a GPU only, True always (also on CPU, where the
    frozen step runs eagerly unless compiled), False never (every step eager, as ``DynamicCache``).
    """

    def __init__(
        self,
        policy: CachePolicy | str | None = None,
        *,
        compiled_decode: bool | None = None,
        decode_reserve: int = 256,
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
        self.compiled_decode = compiled_decode
        self.decode_reserve = decode_reserve
        self.rows = Rows()
        self._pending = 0  # tokens compiled steps appended that the host has not counted yet
        compiled_step.install()
        self._adapter = None
        self._model_ref: weakref.ref | None = None
        self._policy_state: dict[int, dict] = {}
        self._setup_done = False
        self._pruner: hidden_pruning.HiddenPruner | None = None  # the prune-hidden prefill, while it runs
        self._parallel: parallel.TensorParallel | None = None  # this rank's KV heads under tensor parallelism
        # the policy's scoring pass (KVzip): None (none begun), "prompt" (the prompt's forward runs),
        # "chunks" (the pass's forwards run), "done"; and the chunk being run
        self._scoring_state: str | None = None
        self._scoring_chunk: ScoringChunk | None = None
        if policy.needs_scoring_pass:
            scoring_pass.install()

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
    def _layer(self, layer_idx: int) -> PolicyLayer:
        while len(self.layers) <= layer_idx:
            idx = len(self.layers)
            self.layers.append(
                PolicyLayer(idx, self.rows, self.policy.headroom(idx), self.policy.signals.accumulated_attention)
            )
        return self.layers[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, StaticPolicyLayer):
            if key_states.shape[2] == 1:
                if not torch.compiler.is_compiling() and attention_hook.STATIC_CACHE is not self:
                    # an eager decode step over the frozen layers, not begun by CompiledStep: begin it here,
                    # and route this layer's attention through the note (as the dynamic path does)
                    if layer_idx == 0:
                        self.begin_step()
                    attention_hook.PENDING.set(attention_hook.Pending(self, layer_idx))
                return self.layers[layer_idx].update(key_states, value_states)
            self._thaw()
        self._check_new_tokens(key_states.shape[2])
        attention_hook.check_consumed()
        if not self.layers:
            attention_hook.install()
        layer = self._layer(layer_idx)
        pruner = self._pruning()
        cut = pruner.cut(layer_idx) if pruner is not None else {}  # prune-hidden: the tokens this layer was given
        keys, values = layer.append(key_states, value_states, **cut)
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
        self._check_new_tokens(query_length)
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        if layer_idx >= len(self.layers):
            return q, 0
        if q == 1 and isinstance(self.layers[layer_idx], StaticPolicyLayer):
            # the frozen layers replace transformers' mask with their own: keep its shape constant, so a
            # compiled step's inputs do not change shape from one step to the next
            return 1, 0
        return self.layers[layer_idx].total_seen + self._pending + q, 0

    def _check_new_tokens(self, query_length) -> None:
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
        held = self.get_seq_length()
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

    def reset(self) -> None:
        """Empty the cache so it can serve a new prompt (or another model)."""
        hidden_pruning.stop(self._pruner)
        self._pruner = None
        for layer in self.layers:
            layer.reset()
        self.layers = []
        self.rows = Rows()  # a new object: the old one's tensor may be held by a compiled graph
        self._pending = 0
        self._model_ref = None
        self._policy_state = {}
        self._setup_done = False
        self._parallel = None
        self._scoring_state = None
        self._scoring_chunk = None

    def _move_rows(self, fn) -> None:
        """Re-index every per-row record: the layers, padding, prompt lengths, and the values the
        policy marked per-row (:class:`~kvpolicy.core.rows.PerRow`) in its layer state."""
        self._settle()
        for layer in self.layers:
            if layer.keys is not None:
                layer._rows(fn)
        self.rows.reindex(fn, self._policy_state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._move_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._move_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._move_rows(lambda t: t[indices.to(t.device)])

    # ----------------------------------------------------------------- reporting
    def headroom(self, layer_idx: int) -> int:
        return self.policy.headroom(layer_idx)

    def kv_tokens_per_layer(self) -> list[int]:
        """Slots in use per layer (the largest row; rows with fewer valid tokens have masked slots)."""
        self._settle()
        return [layer.length for layer in self.layers]

    def valid_tokens_per_layer(self) -> list[list[int]]:
        """Valid kept tokens per layer and row (the fullest head's, where a head-adaptive policy left the
        heads holding different counts)."""
        self._settle()
        return [[] if layer.keys is None else layer.valid_counts() for layer in self.layers]

    def seen_tokens(self) -> list[int]:
        """Real (non-pad) tokens each row has given the cache, evicted ones included."""
        self._settle()
        return self._seen_real(self.layers[0]) if self.layers else []

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Row-local positions ``[B, H_kv, L]`` kept in ``layer_idx`` (-1 for masked slots)."""
        self._settle()
        return self.layers[layer_idx].local_positions()

    def memory_bytes(self, allocated: bool = True) -> int:
        """Bytes of keys+values held (``allocated``: buffer capacity, else slots in use)."""
        self._settle()
        return sum(layer.kv_bytes(allocated) for layer in self.layers)

    def memory_bytes_per_layer(self, allocated: bool = True) -> list[int]:
        self._settle()
        return [layer.kv_bytes(allocated) for layer in self.layers]

    def signal_bytes(self) -> int:
        """Bytes of bookkeeping beside the KV (positions, query windows, scores)."""
        return sum(layer.signal_bytes() for layer in self.layers)

    # ----------------------------------------------------------------- compiled decoding
    def _decodes_static(self) -> bool:
        """Whether this cache freezes its layers for decoding (see the class docstring)."""
        if self.compiled_decode is None:
            return self.layers[0].keys.device.type == "cuda"
        return self.compiled_decode

    def is_frozen(self) -> bool:
        """True while the layers are the static kind (between compiled decode steps)."""
        return bool(self.layers) and isinstance(self.layers[0], StaticPolicyLayer)

    def enter_compiled_step(self, tokens: int) -> bool:
        """Called (by ``compiled_step.CompiledStep``) before a compiled forward of ``tokens`` per row:
        brings the frozen layers up to date and routes attention to them; False if this forward
        is not a decode step over frozen layers (it then runs as an ordinary forward)."""
        if tokens != 1 or not self.is_frozen():
            return False
        self.begin_step()
        attention_hook.STATIC_CACHE = self
        return True

    def exit_compiled_step(self) -> None:
        attention_hook.STATIC_CACHE = None

    def begin_step(self) -> None:
        """Between decode steps (eager): count the last step's token, let the policy compress, and
        make room for the next token."""
        self._settle()
        for layer in self.layers:
            if layer.length >= layer.capacity:
                # by half again at least: each re-size re-compiles the step (transformers compiles with
                # static shapes), so a long generation must take few of them
                layer.grow(max(layer.length + self._growth(layer), layer.capacity * 3 // 2))
        self._pending = 1

    def attend(self, fn, impl: str, module: Any, query, key, value, args: tuple, kwargs: dict):
        """A compiled step's attention for ``module``'s layer (called by the attention wrapper)."""
        return self.layers[module.layer_idx].attend(fn, impl, module, query, key, value, args, kwargs)

    def _growth(self, layer: PolicyLayer) -> int:
        """Slots a frozen layer reserves for decoding: the policy's bound over ``decode_reserve`` tokens."""
        if not layer.compressible:
            return self.decode_reserve
        return max(1, self.policy.decode_growth(layer.layer_idx, self.rows.prompt_len, self.decode_reserve))

    def _freeze(self) -> None:
        window = self.policy.signals.decode_query_window
        shared = bool(self.policy.shared_positions)
        for i, layer in enumerate(self.layers):
            capacity = layer.length + self._growth(layer)
            self.layers[i] = StaticPolicyLayer.freeze(layer, capacity, window, shared, self._windows[i])
        torch._dynamo.mark_static_address(self.rows.pad)

    def _thaw(self) -> None:
        """Back to dynamic layers, for a forward of more than one token (a continued prompt)."""
        self._settle()
        self.layers = [layer.thaw() if isinstance(layer, StaticPolicyLayer) else layer for layer in self.layers]

    def _settle(self) -> None:
        """Account on the host for the tokens compiled steps appended, then let the policy compress
        (exactly what the eager path's plans would have seen after those tokens' attention)."""
        if not self._pending:
            return
        steps, self._pending = self._pending, 0
        for layer in self.layers:
            layer.settle(steps)
        due = []
        for layer in self.layers:
            if layer.compressible:
                seen = self._seen_real(layer)
                plan = self._plan(self._view(layer, seen, steps, prefill=False))
                if plan is not None and (sel := self._select(layer, plan, seen, "decode")) is not None:
                    due.append((layer, sel))
        if due:  # one read of the device for all layers (each read drains the queue)
            starts = torch.stack([first_moved_slot(index) for _, (index, _) in due]).tolist()
            for (layer, (index, keep)), start in zip(due, starts):
                layer.compact(index, keep, start)

    # ----------------------------------------------------------------- attention hooks
    def _bind(self, module: Any) -> None:
        """First sight of the model: pick the adapter, check support, set the policy up."""
        from .registry import find_adapter

        config = module.config
        self._adapter = find_adapter(config)
        self._adapter.check_attention(config)
        num_layers = config.num_hidden_layers
        compressible = self._adapter.compressible_layers(config)
        self._windows = self._adapter.sliding_windows(config)
        if self.policy.prunes_hidden_states:
            self._adapter.check_prune_hidden(config)
            hidden_pruning.install(self._adapter.decoder_layer_class(module))
        self._config = config
        self.policy.setup(num_layers, compressible)
        self._num_layers = num_layers
        self._compressible = compressible
        self._setup_done = True

    def _check_model(self, layer: PolicyLayer, module: Any) -> None:
        ref = getattr(layer, "module_ref", None)
        if ref is None:
            layer.module_ref = weakref.ref(module)
            layer.scaling = getattr(module, "scaling", None) or module.head_dim**-0.5
            layer.compressible = self._compressible[layer.layer_idx]
        elif ref() is not module:
            raise CacheMisuseError(
                "this cache already holds keys/values of another model; use a new cache per model "
                "(or call cache.reset())"
            )

    def _before_attention(self, layer_idx: int, module: Any, query: torch.Tensor, mask: Any, impl: str):
        """The mask this layer's attention must use: ``mask`` itself while slot ``i`` holds token ``i``,
        else the layer's own, boolean ``[B, H_kv or 1, Q, L]`` (one row per KV head, or one for all)."""
        layer = self.layers[layer_idx]
        if not self._setup_done:
            self._bind(module)
            self._parallel = parallel.detect(module, layer.keys.shape[1])
        self._check_model(layer, module)
        if self.rows.pad is None:
            self.rows.read_padding(mask, query.shape[0], query.device)
        if layer_idx == 0 and self.prompt_len is None and self.policy.prunes_hidden_states:
            hidden_pruning.stop(self._pruner)
            self._pruner = hidden_pruning.start(
                hidden_pruning.HiddenPruner(self._adapter, self._config, self._num_layers, layer.total_seen)
            )
        if layer.contiguous:
            return mask
        if impl not in ("sdpa", "eager"):
            raise CacheMisuseError(
                f"attention implementation {impl!r} cannot attend over a compressed layer; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        return self._allowed(layer, query)

    def _allowed(self, layer: PolicyLayer, query: torch.Tensor) -> torch.Tensor:
        pos = layer.pos_view()  # [B, H, L]
        q = query.shape[2]
        pruner = self._pruning()
        if pruner is not None and pruner.layout.pos is not None:  # prune-hidden prefill: per row
            pos = pos[:, :1]  # every head holds the same tokens: one mask row set serves all heads
            qpos = pruner.layout.columns.view(pos.shape[0], 1, q, 1)  # empty slots query as the last token
        else:
            qpos = layer.query_positions(q, pos.device).view(1, 1, q, 1)
        return masks.allowed(pos, self.rows.pad, qpos, self._windows[layer.layer_idx])

    def _after_attention(self, layer_idx: int, module: Any, query: torch.Tensor) -> None:
        layer = self.layers[layer_idx]
        if self._scoring_chunk is not None:  # a scoring pass's forward: the policy scores, nothing else happens
            if layer.compressible:
                view = self._view(layer, self._seen_real(layer), query.shape[2], prefill=True)
                self.policy.score(view, query, self._scoring_chunk)
            return
        if layer.compressible:
            self._after_layer_attention(layer, query)
        pruner = self._pruning()
        if pruner is not None:  # what the next decoder layer's inputs are cut to
            pruner.layer_done(None if layer.contiguous else layer.pos_view())
        if (layer_idx == self._num_layers - 1 and self.prompt_len is not None and self._decodes_static()
                and self._scoring_state != "prompt"):  # a scoring pass comes first (it freezes when done)
            self._freeze()  # the prompt (or a continuation of it) is in: decode over fixed-shape layers

    def _after_layer_attention(self, layer: PolicyLayer, query: torch.Tensor) -> None:
        layer_idx = layer.layer_idx
        policy = self.policy
        signals = policy.signals
        prefill = self.prompt_len is None
        new = query.shape[2]
        seen = self._seen_real(layer)
        pruner = self._pruning()
        qpos = None if pruner is None else pruner.query_positions()  # per row in a prune-hidden prefill
        if prefill:
            window = signals.prefill_query_window(max(seen))
            layer.record_queries(query, max(window, signals.decode_query_window), qpos)
        elif signals.decode_query_window:
            layer.record_queries(query, signals.decode_query_window, qpos)
        if signals.accumulated_attention:
            layer.accumulate_attention(query, qpos)
        if not prefill and policy.needs_scoring_pass and self._scoring_state != "done":
            raise CacheMisuseError(
                f"the {policy.name} policy scores the prompt with a second forward, run by the model call that fills "
                "the cache (model(...), generate or kvpolicy.prefill); this cache's prompt went through another "
                "route (model.forward(...) called directly, or inputs_embeds without input_ids), so nothing was "
                "scored or evicted. Call the model itself with input_ids on a new cache"
            )
        plan = self._plan(self._view(layer, seen, new, prefill))
        if plan is not None:
            self._apply(layer, plan, seen, "prefill" if prefill else "decode")
        if prefill and layer_idx == self._last_compressible():
            self.rows.prompt_len = list(seen)
        if prefill and layer.qwin is not None:  # keep only what decoding will use
            if signals.decode_query_window == 0:
                layer.qwin = layer.qwin_pos = None
            elif layer.qwin.shape[2] > signals.decode_query_window:
                layer.qwin = layer.qwin[:, :, -signals.decode_query_window :].clone()
                layer.qwin_pos = layer.qwin_pos[..., -signals.decode_query_window :].clone()

    def _view(self, layer: PolicyLayer, seen: list[int], new_tokens: int, prefill: bool) -> LayerView:
        """What the policy's ``plan`` sees of ``layer`` after a forward of ``new_tokens`` per row."""
        return LayerView(
            layer_idx=layer.layer_idx,
            num_layers=self._num_layers,
            phase="prefill" if prefill else "decode",
            layer=layer,
            seen=seen,
            prompt_len=seen if prefill else self.prompt_len,
            new_tokens=new_tokens,
            state=self._policy_state.setdefault(layer.layer_idx, {}),
            parallel=self._parallel,
        )

    def _plan(self, view: LayerView) -> Plan | None:
        """The policy's plan for ``view``; under tensor parallelism, refuses one score row per layer that
        was not merged across the ranks (each rank would keep other tokens, see ``core/parallel.py``).
        Plans ranking slots across heads are exact there: ``_select`` gathers what they need."""
        plan = self.policy.plan(view)
        if (
            view.parallel is not None
            and plan is not None
            and plan.scores is not None
            and plan.scores.shape[1] == 1
            # one row for several heads here, or for a policy whose heads share tokens (with one KV head per
            # rank a per-head policy's scores have one row too)
            and (view.layer.keys.shape[1] > 1 or self.policy.shared_positions)
            and not view.heads_reduced
        ):
            raise CacheMisuseError(
                f"policy {self.policy.name!r} gave one score per slot for all heads of layer {view.layer_idx}, "
                f"computed from the {view.layer.keys.shape[1]} of {view.kv_heads} KV heads this rank holds under "
                "tensor parallelism, so each rank would keep other tokens. Merge heads with "
                "view.mean_over_heads(scores), which reduces across the ranks"
            )
        return plan

    def _pruning(self) -> hidden_pruning.HiddenPruner | None:
        """The prune-hidden prefill in progress, if any."""
        pruner = self._pruner
        return pruner if pruner is not None and pruner.running else None

    def _last_compressible(self) -> int:
        idx = [i for i, c in enumerate(self._compressible) if c]
        return idx[-1] if idx else -1

    def _seen_real(self, layer: PolicyLayer) -> list[int]:
        # host-side: each device read drains the GPU's queue, and this runs once per layer
        return self.rows.seen(layer.total_seen)

    def _apply(self, layer: PolicyLayer, plan: Plan, seen_per_row: list[int], phase: str) -> None:
        selection = self._select(layer, plan, seen_per_row, phase)
        if selection is not None:
            layer.compact(*selection)

    def _select(
        self, layer: PolicyLayer, plan: Plan, seen: list[int], phase: str
    ) -> tuple[torch.Tensor, list[int] | list[list[int]]] | None:
        """The slots ``layer`` keeps under ``plan`` (see ``select_slots``); ``phase`` files a tensor-parallel
        gather in ``parallel.STATS``."""
        if self._parallel is not None and self._ranks_across_heads(layer, plan):
            return self._select_whole_layer(layer, plan, seen, phase)
        return select_slots(
            plan, layer.valid_counts(), layer.local_positions(), layer.pos_view(), seen, self.policy.shared_positions,
            layer.valid_counts_per_head(),
        )

    @staticmethod
    def _ranks_across_heads(layer: PolicyLayer, plan: Plan) -> bool:
        """Whether, under tensor parallelism, selecting ``plan`` needs every rank's heads: a head-adaptive
        split (one top-k over a row's heads), per-head counts, or a layer whose heads over all ranks hold
        different counts. Each leaves the heads with counts that set the layer's width (its fullest head
        over ALL ranks), so a rank alone could not size its buffer as one process does. Decided from the
        plan's structure and the layer's ``group_uneven`` (the same on every rank), never from this rank's
        counts alone: every rank must make the same collective calls."""
        return plan.head_adaptive is not None or plan.per_head or layer.group_uneven

    def _select_whole_layer(
        self, layer: PolicyLayer, plan: Plan, seen: list[int], phase: str
    ) -> tuple[torch.Tensor, list[list[int]]] | None:
        """``select_per_head_parallel``: this rank's heads' share of the selection one process makes
        over the whole layer; records whether the group's heads now hold different counts."""
        local = layer.keys.shape[1]
        head_valid = layer.valid_counts_per_head() or [[n] * local for n in layer.valid_counts()]
        selection = select_per_head_parallel(self._parallel, plan, head_valid, layer.local_positions(),
                                             layer.pos_view(), seen, phase)
        if selection is None:
            return None
        index, counts, whole = selection
        layer.group_uneven = any(len(set(row)) > 1 for row in whole)
        return index, counts

    # ----------------------------------------------------------------- scoring pass (KVzip)
    def begin_scoring_pass(self) -> bool:
        """Asked by the model-call wrapper (``core/scoring_pass.py``) before a forward: True when this is a
        fresh cache whose policy scores the prompt with a second forward; the pass then follows the forward."""
        if not self.policy.needs_scoring_pass or self.layers or self._scoring_state is not None:
            return False
        self._scoring_state = "prompt"
        return True

    @torch.no_grad()
    def run_scoring_pass(self, model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None) -> None:
        """After the prompt's forward (nothing evicted yet): run the policy's scoring chunks through ``model``'s
        base model on top of the prompt (the chunk's tokens appended, scored by ``policy.score`` after each
        layer's attention, then dropped), then apply ``policy.plan_scored`` to every compressible layer.
        Positions continue the prompt's (``position_ids`` as given to it, else the cache's columns)."""
        if self.prompt_len is None:  # the forward failed or met no compressible layer
            self._scoring_state = "done"
            return
        if input_ids is None:
            raise CacheMisuseError(
                f"the {self.policy.name} policy runs the prompt's tokens through the model again to score them, "
                "so the prompt must be given as input_ids (not inputs_embeds)"
            )
        if self.is_frozen():
            self._thaw()
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        chunks = self.policy.scoring_inputs(input_ids, mask)
        base = getattr(model, "base_model", model)
        self._scoring_state = "chunks"
        try:
            for chunk in chunks:
                q = chunk.input_ids.shape[1]
                extra = {}
                if position_ids is not None:
                    steps = torch.arange(1, q + 1, device=position_ids.device).view(1, -1)
                    extra["position_ids"] = position_ids[:, -1:] + steps
                self._scoring_chunk = chunk
                base(input_ids=chunk.input_ids, attention_mask=torch.cat([mask, chunk.attention_mask.to(mask)], 1),
                     use_cache=True, **{cache_argument(base): self}, **extra)
                self._scoring_chunk = None
                for layer in self.layers:
                    layer.drop_last(q)
        finally:
            self._scoring_chunk = None
            self._scoring_state = "done"
        views = [self._view(layer, self._seen_real(layer), 0, prefill=True) for layer in self.layers
                 if layer.compressible]
        for view, plan in zip(views, self.policy.plan_scored(views)):
            if plan is not None:
                self._apply(view.layer, plan, view.seen, "prefill")
        if self._decodes_static():
            self._freeze()

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
        kwargs = {"compiled_decode": self.compiled_decode, "decode_reserve": self.decode_reserve, **settings}
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
        for name in ("_adapter", "_windows", "_num_layers", "_compressible", "_setup_done", "_parallel",
                     "_scoring_state"):
            setattr(self, name, getattr(first, name))
        self.policy.setup(first._num_layers, first._compressible)
        self.rows.pad = torch.cat([c.rows.pad for c in chunks])
        self.rows.pad_host = [p for c in chunks for p in c.rows.pad_host]
        self.rows.prompt_len = [n for c in chunks for n in c.rows.prompt_len]
        self._policy_state = concat_states([c._policy_state for c in chunks])
        for idx in range(len(first.layers)):
            self.layers.append(PolicyLayer.concat([c.layers[idx] for c in chunks], self.rows))
        if self._decodes_static():
            self._freeze()

def make_cache(name_or_config: Any = "full", **overrides: Any) -> PolicyCache:
    """``make_cache("pyramidinfer", prefill_decay_ratio=0.8)`` or ``make_cache(config)``: a
    :class:`PolicyCache` with the named (or configured) policy, settings validated; the cache's own
    settings (``compiled_decode``, ``decode_reserve``) may be passed too."""
    from .registry import make_policy

    settings = {k: overrides.pop(k) for k in CACHE_SETTINGS if k in overrides}
    return PolicyCache(make_policy(name_or_config, **overrides), **settings)
