"""Prefill reads the device back a fixed number of times per forward, not once per layer.

On a GPU each read (``.tolist()``, ``.item()``, ``bool(tensor)``) waits for every queued kernel,
so the CPU's launches for the next layer can no longer overlap the current layer's work; at
32 layers such reads made the compressed prefill ~14% slower than the same forward with
transformers' cache (docs/benchmarks/throughput.md, change 12). A read here is counted on the
CPU through ``__torch_function__``, which sees the same calls a GPU run makes.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from models import batch, tiny_model
from torch.overrides import TorchFunctionMode

import kvpolicy

_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    """Counts reads of a tensor's values into Python, with where each happened."""

    def __init__(self):
        super().__init__()
        self.places: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            frame = traceback.extract_stack(limit=3)[0]
            self.places.append(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")
        return func(*args, **(kwargs or {}))


POLICIES = {
    "pyramidinfer": dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4),
    "pyramidinfer_54_floor": dict(min_context_length=4),
    "pyramidinfer-per-head": dict(policy="pyramidinfer", head_aggregation="kv_head", prefill_decay_ratio=0.5,
                                  min_context_length=4),
    "snapkv": dict(compression_ratio=0.5, window_size=4),
    "pyramidkv": dict(compression_ratio=0.5, window_size=4),
    "streamingllm": dict(compression_ratio=0.5),
}


def prefill_reads(name: str, layers: int, lengths: list[int]) -> tuple[list[str], list[int]]:
    settings = dict(POLICIES[name])
    cache = kvpolicy.make_cache(settings.pop("policy", name), **settings)
    model = tiny_model("llama", "sdpa", layers=layers)
    inputs = batch(lengths, seed=3)
    arg = kvpolicy.cache_argument(model)
    with torch.no_grad(), HostReads() as reads:
        model(**inputs, use_cache=True, logits_to_keep=1, **{arg: cache})
    return reads.places, cache.kv_tokens_per_layer()


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("lengths", [[48, 48], [48, 41, 45]], ids=["equal", "left-padded"])
def test_prefill_reads_do_not_grow_with_depth(name, lengths):
    shallow, kept_shallow = prefill_reads(name, 2, lengths)
    deep, kept_deep = prefill_reads(name, 6, lengths)
    assert min(kept_deep) < max(lengths), "the policy must compress for the test to mean anything"
    assert len(deep) == len(shallow), f"reads per layer: 2 layers read at {shallow}, 6 layers at {deep}"
