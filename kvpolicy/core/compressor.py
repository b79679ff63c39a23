"""Where the policy's decisions meet the layers: the signals recorded after a layer's attention, the
policy's plan, the slots it selects, and the compaction that applies them.

The cache calls :meth:`Compressor.after_attention` for a compressible layer after its attention in
an eager forward, and :meth:`Compressor.after_compiled_steps` between compiled decode steps (the
same plans, over the tokens those steps appended). The policy's own per-layer state
(``CachePolicy.new_layer_state``) lives here, one typed value per layer.

One compaction is the cache's own, for every policy (``full`` included): :meth:`Compressor.free_out_of_window`
frees the tokens of a sliding-window layer that no later query can see (positions before ``newest - window + 2``),
as transformers' ``DynamicSlidingWindowLayer`` does (docs/sliding-window.md). It runs after the layer's
attention and the policy's plan, through the same ``layer.compact`` (positions, scores and quantized codes
move together), all at once after a forward of several tokens (the prompt), and while decoding once the dead
tokens number :func:`dead_group` (an eighth of the window), so that it costs one compaction per
``window / 8`` steps rather than one per step.
"""

from __future__ import annotations

from typing import Any

import torch

from .binding import ModelBinding
from .errors import CacheMisuseError
from .layers import KVLayer, first_moved_slot
from .policy import CachePolicy, LayerView, Plan
from .rows import Rows
from .selection import in_window, select_per_head_parallel, select_slots

Selection = tuple[torch.Tensor, "list[int] | list[list[int]]", "bool | None"]

#: a decoding sliding layer frees what fell out of its window once that is this share of the window: the layer
#: then holds at most ``window - 1 + dead_group(window) - 1`` tokens (an eighth more than transformers' cache)
#: and compacts once per ``dead_group(window)`` steps (Gemma 3's 512: every 64; Mistral's 4,096: every 512)
DEAD_SHARE = 8

#: attention implementations that take kvpolicy's own mask (what a layer needs once its slot ``i`` no longer
#: holds token ``i``); under any other the cache frees nothing out of the window (``full`` stays uncompressed)
MASKED_IMPLEMENTATIONS = ("sdpa", "eager")


def dead_group(window: int) -> int:
    """Tokens out of a decoding sliding layer's window that the cache frees at once (:data:`DEAD_SHARE`)."""
    return max(1, window // DEAD_SHARE)


class Compressor:
    def __init__(self, policy: CachePolicy, rows: Rows):
        self.policy, self.rows = policy, rows
        self.states: dict[int, Any] = {}  # the policy's state per layer (``CachePolicy.new_layer_state``)
        #: whether sliding layers free what fell out of their window (tests turn it off for an oracle that keeps it)
        self.frees_out_of_window = True
        self.recording = False  # transformers asked the layers to record their past (``activate_past_recording``)

    def view(self, layer: KVLayer, binding: ModelBinding, new_tokens: int, prefill: bool) -> LayerView:
        """What the policy's ``plan`` sees of ``layer`` after a forward of ``new_tokens`` per row."""
        idx = layer.layer_idx
        if idx not in self.states:
            self.states[idx] = self.policy.new_layer_state()
        seen = self.rows.seen(layer.total_seen)  # host-side: each device read drains the GPU's queue
        return LayerView(
            layer_idx=idx, num_layers=binding.num_layers, phase="prefill" if prefill else "decode", layer=layer,
            seen=seen, prompt_len=seen if prefill else self.rows.prompt_len, new_tokens=new_tokens,
            state=self.states[idx], parallel=binding.parallel, module=binding.module(idx),
        )

    def after_attention(self, layer: KVLayer, binding: ModelBinding, query: torch.Tensor,
                        qpos: torch.Tensor | None, plans_deferred: bool) -> None:
        """After ``layer``'s attention in an eager forward of ``query``'s tokens (at absolute positions
        ``qpos`` ``[B, q]`` in a prune-hidden prefill, else the newest ones): record the signals the policy
        asked for, then apply its plan. ``plans_deferred``: a scoring pass is still to come (checked)."""
        signals = self.policy.signals
        prefill = self.rows.prompt_len is None
        query = query.detach()  # the signals are bookkeeping, never part of the model's autograd graph
        if prefill:
            window = signals.prefill_query_window(max(self.rows.seen(layer.total_seen)))
            layer.record_queries(query, max(window, signals.decode_query_window), qpos)
        elif signals.decode_query_window:
            layer.record_queries(query, signals.decode_query_window, qpos)
        if signals.accumulated_attention:
            layer.accumulate_attention(query, qpos)
        if not prefill and plans_deferred:
            raise CacheMisuseError(
                f"the {self.policy.name} policy scores the prompt with a second forward, run by the model call that "
                "fills the cache (model(...), generate or kvpolicy.prefill); this cache's prompt went through another "
                "route (model.forward(...) called directly, or inputs_embeds without input_ids), so nothing was "
                "scored or evicted. Call the model itself with input_ids on a new cache"
            )
        view = self.view(layer, binding, query.shape[2], prefill)
        self.apply(view, self.plan(view))
        if prefill and layer.layer_idx == binding.last_compressible:
            self.rows.prompt_len = list(view.seen)
        if prefill:  # keep only what decoding will use
            layer.keep_recent_queries(signals.decode_query_window)

    def after_compiled_steps(self, layers: list[KVLayer], binding: ModelBinding, steps: int) -> None:
        """The plans of every compressible layer after ``steps`` compiled steps appended tokens (counted
        already): what the eager path's plans would have done after those tokens' attention."""
        due = []
        for layer in layers:
            if layer.compressible:
                view = self.view(layer, binding, steps, prefill=False)
                plan = self.plan(view)
                if plan is not None and (sel := self.select(view, plan)) is not None:
                    due.append((layer, sel))
        if due:  # one read of the device for all layers (each read drains the queue)
            starts = torch.stack([first_moved_slot(index) for _, (index, _, _) in due]).tolist()
            for (layer, (index, keep, uneven)), start in zip(due, starts):
                layer.compact(index, keep, start, uneven)
        self.free_out_of_window(layers, binding)

    # ----------------------------------------------------------------- sliding windows
    def free_out_of_window(self, layers: list[KVLayer], binding: ModelBinding | None, force: bool = False,
                           cropped: bool = False) -> None:
        """Free, in each sliding layer of ``layers``, the tokens no later query can see (before ``total_seen -
        window + 1``; pads and empty slots go too), once they number :func:`dead_group` (``force``: one at
        least, after a forward of several tokens). Call it after the layers' attention and plans. A layer
        recording its past for a rollback keeps them until it is cropped (``cropped``: the call after a crop).
        Every due layer's counts come back in one device read."""
        due = [(layer, floor) for layer in layers if (floor := self._dead_floor(layer, binding, force, cropped))]
        if not due:
            return
        picks = [in_window(layer.pos_view(), self.rows.pad, floor) for layer, floor in due]
        tp = binding.parallel
        # under tensor parallelism, the whole layer's counts where its heads may hold other positions (so other counts):
        # every rank makes the layer as wide as its fullest head over all ranks (the same decision on every rank)
        counts = [c if tp is None or layer.complete or self.policy.shared_positions else tp.gather_heads(c)
                  for (layer, _), (_, c) in zip(due, picks)]
        host = torch.cat([c.flatten() for c in counts]).tolist()
        at = 0
        for (layer, floor), (order, _), whole in zip(due, picks, counts):
            b, h = whole.shape
            rows = [host[at + r * h : at + (r + 1) * h] for r in range(b)]
            at += b * h
            mine = rows if tp is None or h == tp.local else [row[tp.offset : tp.offset + tp.local] for row in rows]
            layer.freed_below = floor
            if all(n == layer.length for row in rows for n in row):  # (every rank decides alike)
                continue  # every slot is a live token: nothing to free
            keep = [row[0] for row in mine] if all(len(set(row)) == 1 for row in mine) else mine
            uneven = None if tp is None else any(len(set(row)) > 1 for row in rows) or None
            kept = layer.since_compress, layer.complete  # the policy's cadence, and what crop may undo, stay
            layer.compact(order[..., : max(map(max, rows))], keep, 0, uneven)
            layer.since_compress, layer.complete = kept

    def _dead_floor(self, layer: KVLayer, binding: ModelBinding | None, force: bool, cropped: bool) -> int:
        """The position before which ``layer`` frees its tokens now (0: not now)."""
        if not self.frees_sliding(layer, binding) or layer.record_past and not cropped:
            return 0
        floor = layer.total_seen - layer.window + 1
        return floor if floor - layer.freed_below >= (1 if force else dead_group(layer.window)) else 0

    def frees_sliding(self, layer: KVLayer, binding: ModelBinding | None) -> bool:
        """Whether ``layer`` is a sliding layer whose dead tokens this cache frees (a window of one token would
        leave nothing, where transformers keeps everything: it is left alone too)."""
        return (self.frees_out_of_window and layer.window is not None and layer.window > 1 and layer.holds_tokens
                and binding is not None
                and getattr(binding.config, "_attn_implementation", None) in MASKED_IMPLEMENTATIONS)

    def decode_growth(self, layer: KVLayer, binding: ModelBinding | None, reserve: int) -> int:
        """Slots a frozen layer reserves for decoding: the policy's bound over ``reserve`` tokens (all of them for a
        layer it may not compress), but no more than a sliding layer whose dead tokens are freed between steps
        ever holds: ``window - 1`` live tokens, ``dead_group - 1`` dead ones, and the next one."""
        growth = max(1, reserve if not layer.compressible else self.policy.decode_growth(
            layer.layer_idx, self.rows.prompt_len, reserve))
        if not self.frees_sliding(layer, binding) or layer.record_past:
            return growth
        return max(1, min(growth, layer.window + dead_group(layer.window) - 1 - layer.length))

    def plan(self, view: LayerView) -> Plan | None:
        """The policy's plan for ``view``; under tensor parallelism, refuses one score row per layer that
        was not merged across the ranks (each rank would keep other tokens, see ``core/parallel.py``).
        Plans ranking slots across heads are exact there: :meth:`select` gathers what they need."""
        plan = self.policy.plan(view)
        if (
            view.parallel is not None
            and plan is not None
            and plan.scores is not None
            and plan.scores.shape[1] == 1
            # one row for several heads here, or for a policy whose heads share tokens (with one KV head per
            # rank a per-head policy's scores have one row too)
            and (view.layer.kv_heads > 1 or self.policy.shared_positions)
            and not view.heads_reduced
        ):
            raise CacheMisuseError(
                f"policy {self.policy.name!r} gave one score per slot for all heads of layer {view.layer_idx}, "
                f"computed from the {view.layer.kv_heads} of {view.kv_heads} KV heads this rank holds under "
                "tensor parallelism, so each rank would keep other tokens. Merge heads with "
                "view.mean_over_heads(scores), which reduces across the ranks"
            )
        return plan

    def apply(self, view: LayerView, plan: Plan | None) -> None:
        if plan is not None and (selection := self.select(view, plan)) is not None:
            view.layer.compact(*selection)

    def select(self, view: LayerView, plan: Plan) -> Selection | None:
        """The slots ``view.layer`` keeps under ``plan`` (see ``select_slots``), with, under tensor
        parallelism, whether the whole layer's heads now hold different counts."""
        layer = view.layer
        if view.parallel is not None and ranks_across_heads(layer, plan):
            return self._select_whole_layer(view, plan)
        selection = select_slots(
            plan, layer.valid_counts(), layer.local_positions(), layer.pos_view(), view.seen,
            self.policy.shared_positions, layer.valid_counts_per_head(),
        )
        return None if selection is None else (*selection, None)

    def _select_whole_layer(self, view: LayerView, plan: Plan) -> Selection | None:
        """``select_per_head_parallel``: this rank's heads' share of the selection one process makes
        over the whole layer."""
        layer = view.layer
        local = layer.kv_heads
        head_valid = layer.valid_counts_per_head() or [[n] * local for n in layer.valid_counts()]
        selection = select_per_head_parallel(view.parallel, plan, head_valid, layer.local_positions(),
                                             layer.pos_view(), view.seen, view.phase)
        if selection is None:
            return None
        index, counts, whole = selection
        return index, counts, any(len(set(row)) > 1 for row in whole)


def ranks_across_heads(layer: KVLayer, plan: Plan) -> bool:
    """Whether, under tensor parallelism, selecting ``plan`` needs every rank's heads: a head-adaptive
    split (one top-k over a row's heads), per-head counts, or a layer whose heads over all ranks hold
    different counts. Each leaves the heads with counts that set the layer's width (its fullest head
    over ALL ranks), so a rank alone could not size its buffer as one process does. Decided from the
    plan's structure and the layer's ``group_uneven`` (the same on every rank), never from this rank's
    counts alone: every rank must make the same collective calls."""
    return plan.head_adaptive is not None or plan.per_head or layer.group_uneven
