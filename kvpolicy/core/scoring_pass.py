"""A scoring pass after the prompt's forward: "a policy may ask for one extra forward over inputs of its
own" (KVzip scores the prompt's KV pairs so, running the model again over the prompt's cache on a
reconstruction of the prompt; ``CachePolicy.needs_scoring_pass``).

The cache meets the model only inside attention, where neither the model object nor the prompt's
token ids are in reach, and the prompt's forward must have finished before the second one starts.
The one place that has both, right after the prompt's forward, is the model call itself
(``core/model_call.py``): when the call's cache is a fresh ``PolicyCache`` whose policy needs a
pass, the prompt's forward runs as usual (the policy defers its plans), then :meth:`ScoringPass.run`
runs the policy's chunks through the model's base model and compresses.
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from . import model_call
from .compat import cache_argument
from .errors import CacheMisuseError
from .policy import ScoringChunk


class Stage(enum.Enum):
    IDLE = "idle"  # no pass begun
    PROMPT = "prompt"  # the prompt's forward runs; the pass follows it
    CHUNKS = "chunks"  # the pass's forwards run
    DONE = "done"


class ScoringPass:
    """A cache's scoring pass: "a policy may ask for one extra forward over inputs of its own, after the
    prompt's forward and before anything is evicted" (``CachePolicy.needs_scoring_pass``)."""

    def __init__(self, wanted: bool):
        self.wanted = wanted
        self.stage = Stage.IDLE
        self.chunk: ScoringChunk | None = None  # the chunk whose forward runs now
        if wanted:
            model_call.install()

    def begin(self, cache_is_empty: bool) -> bool:
        if not self.wanted or not cache_is_empty or self.stage is not Stage.IDLE:
            return False
        self.stage = Stage.PROMPT
        return True

    @property
    def defers_plans(self) -> bool:
        """The policy plans only after its pass: decoding before the pass is done is a misuse."""
        return self.wanted and self.stage is not Stage.DONE

    @property
    def prompt_running(self) -> bool:
        return self.stage is Stage.PROMPT

    @torch.no_grad()
    def run(self, cache: Any, model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None) -> None:
        """After the prompt's forward (nothing evicted yet): run the policy's scoring chunks through ``model``'s
        base model on top of the prompt (the chunk's tokens appended, scored by ``policy.score`` after each
        layer's attention, then dropped), then apply ``policy.plan_scored`` to every compressible layer.
        Positions continue the prompt's (``position_ids`` as given to it, else the cache's columns)."""
        policy = cache.policy
        if cache.prompt_len is None:  # the forward failed or met no compressible layer
            self.stage = Stage.DONE
            return
        if input_ids is None:
            raise CacheMisuseError(
                f"the {policy.name} policy runs the prompt's tokens through the model again to score them, "
                "so the prompt must be given as input_ids (not inputs_embeds)"
            )
        cache.thaw()
        mask = attention_mask
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            # no mask, or the 4-D one transformers builds for a compileable cache: each row's padding as the
            # cache read it from the prompt's forward
            width = input_ids.shape[1]
            pads = cache.rows.pad_host or [0] * input_ids.shape[0]
            mask = (torch.arange(width).view(1, -1) >= torch.tensor(pads).view(-1, 1)).long().to(input_ids.device)
        chunks = policy.scoring_inputs(input_ids, mask)
        base = getattr(model, "base_model", model)
        self.stage = Stage.CHUNKS
        try:
            for chunk in chunks:
                q = chunk.input_ids.shape[1]
                extra = {}
                if position_ids is not None:
                    steps = torch.arange(1, q + 1, device=position_ids.device).view(1, -1)
                    extra["position_ids"] = position_ids[:, -1:] + steps
                self.chunk = chunk
                base(input_ids=chunk.input_ids, attention_mask=torch.cat([mask, chunk.attention_mask.to(mask)], 1),
                     use_cache=True, **{cache_argument(base): cache}, **extra)
                self.chunk = None
                for layer in cache.layers:
                    layer.drop_last(q)
        finally:
            self.chunk = None
            self.stage = Stage.DONE
        views = [cache.compressor.view(layer, cache.binding, 0, prefill=True) for layer in cache.layers
                 if layer.compressible]
        for view, plan in zip(views, policy.plan_scored(views)):
            cache.compressor.apply(view, plan)
        cache.compressor.free_out_of_window(cache.layers, cache.binding, force=True)  # what left a sliding window
        cache.start_decoding()
