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

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache

from . import attention_hook, hidden_pruning
from .errors import CacheMisuseError, UnsupportedModelError
from .layer_store import PolicyLayer
from .policy import CachePolicy, LayerView, Plan, per_row


class PolicyCache(Cache):
    """A KV cache driven by a :class:`CachePolicy`; pass it as ``past_key_values`` to ``generate``.

    Example::

        cache = PolicyCache(make_policy("pyramidinfer"))
        model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        cache.kv_tokens_per_layer(); cache.memory_bytes()
    """

    is_compileable = False

    def __init__(self, policy: CachePolicy | str | None = None, **overrides: Any):
        super().__init__(layers=[])
        if policy is None or isinstance(policy, str):
            from .registry import make_policy

            policy = make_policy(policy or "full", **overrides)
        elif overrides:
            raise TypeError("pass overrides either to the policy or to PolicyCache(name, **overrides), not both")
        self.policy: CachePolicy = policy
        self.pad: torch.Tensor | None = None  # left padding per row [B]
        self.pad_host: list[int] | None = None  # the same on the host: per-row arithmetic without a device sync
        self.prompt_len: list[int] | None = None
        self._adapter = None
        self._model_ref: weakref.ref | None = None
        self._policy_state: dict[int, dict] = {}
        self._setup_done = False
        self._hidden: hidden_pruning.Layout | None = None  # set during a prune-hidden prefill

    # ----------------------------------------------------------------- Cache API
    def _layer(self, layer_idx: int) -> PolicyLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(PolicyLayer(self, len(self.layers)))
        return self.layers[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._check_new_tokens(key_states.shape[2])
        attention_hook.check_consumed()
        if not self.layers:
            attention_hook.install()
        layer = self._layer(layer_idx)
        hidden = self._hidden
        cut: dict[str, Any] = {}
        if hidden is not None and layer_idx > 0:  # prune-hidden prefill: the tokens this layer was given
            if hidden.layer != layer_idx:
                raise UnsupportedModelError(
                    f"decoder layer {layer_idx} ran without kvpolicy cutting its inputs (its forward bypasses the "
                    "adapter's decoder-layer class); use prefill_mode='cache_only'"
                )
            if hidden.pos is not None:
                cut = {"positions": hidden.pos, "width": hidden.width}
        keys, values = layer.append(key_states, value_states, **cut)
        attention_hook.PENDING.set(attention_hook.Pending(self, layer_idx))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """True number of tokens seen (pads included, as transformers counts), not tokens kept."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].total_seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        self._check_new_tokens(query_length)
        if layer_idx >= len(self.layers):
            q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
            return q, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

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
        return -1 if self.pad is None else int(self.pad.shape[0])

    @property
    def batch_size(self) -> int:
        return self.max_batch_size

    def reset(self) -> None:
        """Empty the cache so it can serve a new prompt (or another model)."""
        hidden_pruning.stop(self)
        for layer in self.layers:
            layer.reset()
        self.layers = []
        self.pad = self.pad_host = None
        self.prompt_len = None
        self._model_ref = None
        self._policy_state = {}
        self._setup_done = False

    def _rows(self, fn) -> None:
        """Re-index every per-row record: padding, prompt lengths, and the policies' per-row
        lists in their layer state (by convention, a list with one entry per batch row)."""
        if self.pad is None:
            return
        rows = self.pad.shape[0]
        order = fn(torch.arange(rows)).tolist()
        self.pad = fn(self.pad)
        self.pad_host = [self.pad_host[i] for i in order]
        if self.prompt_len is not None:
            self.prompt_len = [self.prompt_len[i] for i in order]
        for state in self._policy_state.values():
            for key, value in state.items():
                if isinstance(value, list) and len(value) == rows:
                    state[key] = [value[i] for i in order]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices.to(t.device)])

    # ----------------------------------------------------------------- reporting
    def headroom(self, layer_idx: int) -> int:
        return self.policy.headroom(layer_idx)

    def kv_tokens_per_layer(self) -> list[int]:
        """Slots in use per layer (the largest row; rows with fewer valid tokens have masked slots)."""
        return [layer.length for layer in self.layers]

    def valid_tokens_per_layer(self) -> list[list[int]]:
        """Valid kept tokens per layer and row (heads hold equal counts)."""
        return [[] if layer.keys is None else layer.valid_counts() for layer in self.layers]

    def seen_tokens(self) -> list[int]:
        """Real (non-pad) tokens each row has given the cache, evicted ones included."""
        return self._seen_real(self.layers[0]) if self.layers else []

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Row-local positions ``[B, H_kv, L]`` kept in ``layer_idx`` (-1 for masked slots)."""
        return self.layers[layer_idx].local_positions()

    def memory_bytes(self, allocated: bool = True) -> int:
        """Bytes of keys+values held (``allocated``: buffer capacity, else slots in use)."""
        return sum(layer.kv_bytes(allocated) for layer in self.layers)

    def memory_bytes_per_layer(self, allocated: bool = True) -> list[int]:
        return [layer.kv_bytes(allocated) for layer in self.layers]

    def signal_bytes(self) -> int:
        """Bytes of bookkeeping beside the KV (positions, query windows, scores)."""
        return sum(layer.signal_bytes() for layer in self.layers)

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

    def _find_pad(self, mask: torch.Tensor | None, batch: int, device: torch.device) -> None:
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

    def _before_attention(self, layer_idx: int, module: Any, query: torch.Tensor, mask: Any, impl: str):
        """The mask this layer's attention must use: ``mask`` itself while slot ``i`` holds token ``i``,
        else the layer's own, boolean ``[B, H_kv or 1, Q, L]`` (one row per KV head, or one for all)."""
        if not self._setup_done:
            self._bind(module)
        layer = self.layers[layer_idx]
        self._check_model(layer, module)
        if self.pad is None:
            self._find_pad(mask, query.shape[0], query.device)
        if layer_idx == 0 and self.prompt_len is None and self.policy.prunes_hidden_states:
            hidden_pruning.start(self, layer.total_seen)
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
        if self._hidden is not None and self._hidden.pos is not None:  # prune-hidden prefill: per row
            pos = pos[:, :1]  # every head holds the same tokens: one mask row set serves all heads
            qpos = self._hidden.columns.view(pos.shape[0], 1, q, 1)  # empty slots query as the last token
        else:
            qpos = layer.query_positions(q, pos.device).view(1, 1, q, 1)
        valid = pos >= self.pad.view(-1, 1, 1)
        allowed = valid.unsqueeze(2) & (pos.unsqueeze(2) <= qpos)  # [B, H, Q, L]
        window = self._windows[layer.layer_idx]
        if window is not None:  # sliding layer: what transformers' sliding mask would allow
            allowed &= pos.unsqueeze(2) > qpos - window
        return allowed

    def _after_attention(self, layer_idx: int, module: Any, query: torch.Tensor) -> None:
        layer = self.layers[layer_idx]
        if not layer.compressible:
            return
        policy = self.policy
        signals = policy.signals
        prefill = self.prompt_len is None
        new = query.shape[2]
        seen = self._seen_real(layer)
        qpos = None if self._hidden is None else self._hidden.pos  # per row in a prune-hidden prefill
        if prefill:
            window = signals.prefill_query_window(max(seen))
            layer.record_queries(query, max(window, signals.decode_query_window), qpos)
        elif signals.decode_query_window:
            layer.record_queries(query, signals.decode_query_window, qpos)
        if signals.accumulated_attention:
            layer.accumulate_attention(query, qpos)
        plan = policy.plan(self._view(layer, seen, new, prefill))
        if plan is not None:
            self._apply(layer, plan, seen)
        if prefill and layer_idx == self._last_compressible():
            self.prompt_len = seen
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
        )

    def _enter_decoder_layer(self, decoder_layer: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Prune-hidden prefill: cut decoder layer ``l``'s inputs to the tokens layer ``l - 1`` kept.

        Called by the decoder-layer wrapper (``hidden_pruning.install``) with the layer's inputs by
        parameter name; returns them cut, and whether this is the model's last decoder layer.
        """
        idx, config = self._adapter.layer_index(decoder_layer)
        hidden = self._hidden
        if idx is None or config is not self._config or idx == 0:
            return inputs, False
        hidden.layer = idx
        prev = self.layers[idx - 1]
        index = None
        if not prev.contiguous:  # layer idx-1 was given or kept a subset: the next layer gets its kept tokens
            pos = prev.pos_view()
            if not bool((pos == pos[:, :1]).all()):
                raise CacheMisuseError(
                    "prefill_mode='prune_hidden' needs every KV head of a layer to keep the same tokens "
                    f"(policy {self.policy.name!r} kept different ones per head); use head_aggregation='layer'"
                )
            kept = hidden_pruning.kept_layout(pos[:, 0], hidden.width)
            if hidden.pos is None or not torch.equal(kept, hidden.pos):
                index = hidden_pruning.hidden_index(hidden.pos, kept, hidden.width)
                hidden.pos, hidden.memo = kept, {}
        if hidden.pos is not None:
            inputs = self._adapter.slice_layer_inputs(inputs, index, hidden)
        return inputs, idx == self._num_layers - 1

    def _last_compressible(self) -> int:
        idx = [i for i, c in enumerate(self._compressible) if c]
        return idx[-1] if idx else -1

    def _seen_real(self, layer: PolicyLayer) -> list[int]:
        # host-side: each device read drains the GPU's queue, and this runs once per layer
        return [layer.total_seen - p for p in self.pad_host]

    def _apply(self, layer: PolicyLayer, plan: Plan, seen_per_row: list[int]) -> None:
        selection = self._select(layer, plan, seen_per_row)
        if selection is not None:
            layer.compact(*selection)

    def _select(self, layer: PolicyLayer, plan: Plan, seen_per_row: list[int]) -> tuple[torch.Tensor, list[int]] | None:
        """Turn a plan into the slots to keep (``index`` ``[B, H or 1, K]``, sorted by position, and
        each row's count): protect sinks/recent, drop invalid, top-k. None: nothing to evict.

        Per-row numbers stay on the host (``per_row``): each blocking copy to the GPU would stall
        the queue, and in the static decode path this runs between compiled steps. When every head
        keeps the same positions (``shared_positions``) and the scores are per layer, the selection
        runs once per row rather than once per head."""
        n_valid = layer.valid_counts()
        keep = [max(0, min(int(k), n)) for k, n in zip(plan.keep, n_valid)]
        if all(k >= n for k, n in zip(keep, n_valid)):
            return None  # nothing to evict (masked pads stay masked by transformers' own mask)
        local = layer.local_positions()  # [B, H, L]
        if self.policy.shared_positions and (plan.scores is None or plan.scores.shape[1] == 1):
            local = local[:, :1]
        b, h, L = local.shape
        valid = local >= 0
        if plan.scores is None:
            scores = local.float()  # recency
        else:
            scores = plan.scores.float().expand(b, h, L).clone()
        # protections never exceed a row's budget: the newest tokens first, then the sinks
        rows = range(b)
        recent = [min(k, r) for k, r in zip(keep, plan.recent if isinstance(plan.recent, list) else [plan.recent] * b)]
        plan_sinks = plan.sinks if isinstance(plan.sinks, list) else [plan.sinks] * b
        sinks = [min(k - r, s) for k, r, s in zip(keep, recent, plan_sinks)]
        threshold = [seen_per_row[i] - recent[i] for i in rows]
        protected = (local < per_row(sinks, local.device)) | (local >= per_row(threshold, local.device))
        scores = scores.masked_fill(protected, float("inf"))
        scores = scores.masked_fill(~valid, float("-inf"))
        k_max = max(keep) if keep else 0
        top = scores.topk(k_max, dim=-1, sorted=True).indices  # best first
        chosen_pos = layer.pos_view()[:, :h].gather(2, top)
        if min(keep) < k_max:  # rows keeping fewer than k_max: their surplus picks sort last, invalid
            rank = torch.arange(k_max, device=local.device).view(1, 1, -1)
            big = torch.iinfo(chosen_pos.dtype).max
            chosen_pos = torch.where(rank < per_row(keep, local.device), chosen_pos, torch.full_like(chosen_pos, big))
        order = chosen_pos.argsort(dim=-1)
        return top.gather(2, order), keep


def make_cache(name_or_config: Any = "full", **overrides: Any) -> PolicyCache:
    """``make_cache("pyramidinfer", prefill_decay_ratio=0.8)`` or ``make_cache(config)``: a
    :class:`PolicyCache` with the named (or configured) policy, settings validated."""
    from .registry import make_policy

    return PolicyCache(make_policy(name_or_config, **overrides))
