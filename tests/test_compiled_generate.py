"""``model.generate`` with a kvpolicy cache decodes through a compiled step (the one fast path).

transformers compiles the decode step itself for a compileable cache; here compilation is forced
on the CPU through its ``CompileConfig`` (``_compile_all_devices``) with the cheap ``eager`` dynamo
backend: dynamo captures the step's graph as on a GPU (the part that can break: graph breaks,
recompiles, Python state read inside the graph), without inductor's compile time. The oracle is
the eager path: the same cache with ``compiled_decode=False`` (every step eager), and for
``full`` transformers' ``DynamicCache``.
"""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, attentions, batch, tiny_model
from torch._dynamo.utils import counters
from transformers import CompileConfig, DynamicCache

import kvpolicy
from kvpolicy.core.layers import FrozenLayer

NEW = 12
LENGTHS = [30, 24, 40]
POLICIES = {
    "pyramidinfer": dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4,
                         exceed_length_to_compress=4),
    "snapkv": dict(compression_ratio=0.5, window_size=4),
    "streamingllm": dict(budget=12),
    "h2o": dict(budget=16),
}


def compile_config() -> CompileConfig:
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    return config


def run(model, inputs, cache, compiled: bool, new_tokens: int = NEW, seed: int = 0, **settings):
    extra = {"compile_config": compile_config()} if compiled else {"disable_compile": True}
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, **{kvpolicy.cache_argument(model): cache}, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0, **extra, **settings)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def greedy_generate(model, inputs, cache, compiled: bool, new_tokens: int = 12):
    return run(model, inputs, cache, compiled, new_tokens, do_sample=False)


def compiled_and_eager(model, policy: str, settings: dict, lengths: tuple[int, ...] = (30, 24, 40)):
    """``(compiled, eager)``: caches of ``policy`` after greedy ``generate`` through the compiled decode step
    (forced on the CPU, ``eager`` dynamo backend) and through the eager path, checked to have frozen their
    layers, captured one graph (so ``decode_growth`` sized the buffers) and given the same tokens. Call
    with dynamo reset (the ``fresh_dynamo`` fixture)."""
    inputs = batch(list(lengths))
    eager = kvpolicy.make_cache(policy, compiled_decode=False, **settings)
    expected = greedy_generate(model, inputs, eager, compiled=False)
    cache = kvpolicy.make_cache(policy, compiled_decode=True, **settings)
    got = greedy_generate(model, inputs, cache, compiled=True)
    assert isinstance(cache.layers[-1], FrozenLayer), "the layers were not frozen for decoding"
    assert graphs() == 1, "the decode step was not captured as one graph (or a buffer was re-sized)"
    assert torch.equal(got, expected)
    return cache, eager


@pytest.fixture(autouse=True)
def _fresh_dynamo(fresh_dynamo):
    """Every test here starts and ends with dynamo's caches and counters empty."""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_compiled_generate_equals_dynamic_cache(family):
    attn = attentions(family)[0]
    model = tiny_model(family, attn)
    inputs = batch(LENGTHS)
    expected = run(model, inputs, DynamicCache(config=model.config), compiled=False, do_sample=False)
    cache = kvpolicy.make_cache("full", compiled_decode=True)
    got = run(model, inputs, cache, compiled=True, do_sample=False)
    assert isinstance(cache.layers[0], FrozenLayer), "the layers were not frozen for decoding"
    assert graphs() == 1, "the decode step was not captured as one graph"
    assert torch.equal(got, expected)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_compressing_policies_compiled_equal_the_eager_path(policy):
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS)
    eager = kvpolicy.make_cache(policy, compiled_decode=False, **POLICIES[policy])
    expected = run(model, inputs, eager, compiled=False, do_sample=False)
    cache = kvpolicy.make_cache(policy, compiled_decode=True, **POLICIES[policy])
    got = run(model, inputs, cache, compiled=True, do_sample=False)
    assert graphs() == 1
    assert torch.equal(got, expected)
    assert cache.kv_tokens_per_layer() == eager.kv_tokens_per_layer()
    assert cache.valid_tokens_per_layer() == eager.valid_tokens_per_layer()
    assert cache.kv_tokens_per_layer()[-1] < max(LENGTHS) + NEW, "the policy must have evicted something"
    for layer in range(len(cache.layers)):
        assert torch.equal(cache.kept_positions(layer), eager.kept_positions(layer))


SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3)


@pytest.mark.parametrize("policy", ["full", "pyramidinfer"])
def test_sampling_with_a_seed_gives_the_eager_tokens(policy):
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS)
    settings = POLICIES.get(policy, {})
    expected = run(model, inputs, kvpolicy.make_cache(policy, compiled_decode=False, **settings), compiled=False,
                   seed=5, **SAMPLING)
    got = run(model, inputs, kvpolicy.make_cache(policy, compiled_decode=True, **settings), compiled=True,
              seed=5, **SAMPLING)
    greedy = run(model, inputs, kvpolicy.make_cache(policy, compiled_decode=False, **settings), compiled=False,
                 do_sample=False)
    assert graphs() == 1
    assert torch.equal(got, expected)
    assert not torch.equal(got, greedy), "sampling must have drawn other tokens than greedy decoding"


def test_num_return_sequences_eos_and_streamer():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    model = tiny_model("llama", "sdpa")
    inputs = batch([30])
    settings = dict(do_sample=True, num_return_sequences=3, top_k=20)
    expected = run(model, inputs, kvpolicy.make_cache("pyramidinfer", compiled_decode=False,
                                                      **POLICIES["pyramidinfer"]), compiled=False, seed=3, **settings)
    eos = int(expected[0, 30 + 4])  # a token the first sequence emits mid-way: that row stops there
    streamer = Collect()
    outs = []
    for compiled in (False, True):
        cache = kvpolicy.make_cache("pyramidinfer", compiled_decode=compiled, **POLICIES["pyramidinfer"])
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(model.generate(**inputs, **{kvpolicy.cache_argument(model): cache}, max_new_tokens=NEW,
                                       pad_token_id=0, eos_token_id=eos, streamer=streamer if compiled else None,
                                       **({"compile_config": compile_config()} if compiled else
                                          {"disable_compile": True}), **settings))
    assert outs[0].shape[0] == 3
    assert torch.equal(outs[0], outs[1])
    assert (outs[1][0, 30:] == eos).any(), "the row that emitted eos stopped there"
    streamed = torch.cat([c.view(-1, 1) if c.dim() == 1 else c for c in streamer.chunks[1:-1]], dim=1)
    assert torch.equal(streamed, outs[1][:, 30:30 + streamed.shape[1]])
    assert graphs() == 1


def test_a_layer_that_fills_its_reserve_is_resized():
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS)
    expected = run(model, inputs, DynamicCache(config=model.config), compiled=False, do_sample=False)
    cache = kvpolicy.make_cache("full", compiled_decode=True, decode_reserve=4)
    got = run(model, inputs, cache, compiled=True, do_sample=False)
    assert torch.equal(got, expected)
    assert cache.layers[0].capacity >= max(LENGTHS) + NEW - 1


def test_a_second_call_with_a_new_cache_reuses_the_graph():
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS)
    first = run(model, inputs, kvpolicy.make_cache("snapkv", compiled_decode=True, **POLICIES["snapkv"]),
                compiled=True, do_sample=False)
    second = run(model, inputs, kvpolicy.make_cache("snapkv", compiled_decode=True, **POLICIES["snapkv"]),
                 compiled=True, do_sample=False)
    assert torch.equal(first, second)
    assert graphs() == 1, "a new cache of the same shapes must not recompile the step"


def test_row_chunked_prefill_then_generate_continues():
    """``kvpolicy.prefill`` in chunks of rows, then plain ``generate`` on the same cache: with ``full``,
    the tokens of one ``generate`` call over a DynamicCache."""
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS)
    expected = run(model, inputs, DynamicCache(config=model.config), compiled=False, do_sample=False)
    cache = kvpolicy.make_cache("full", compiled_decode=True)
    logits = kvpolicy.prefill(model, inputs["input_ids"], inputs["attention_mask"], cache, rows=2)
    first = logits.argmax(-1, keepdim=True)
    assert torch.equal(first[:, 0], expected[:, max(LENGTHS)])
    assert [len(r) for r in cache.valid_tokens_per_layer()] == [3] * 4
    ids = torch.cat([inputs["input_ids"], first], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(first)], 1)
    got = run(model, {"input_ids": ids, "attention_mask": mask}, cache, compiled=True, new_tokens=NEW - 1,
              do_sample=False)
    assert torch.equal(got, expected)


def test_a_frozen_cache_continues_with_a_longer_input():
    """A second forward of several tokens (a continued chat) thaws the frozen layers."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([30])
    cache = kvpolicy.make_cache("full", compiled_decode=True)
    out = run(model, inputs, cache, compiled=True, do_sample=False)
    more = torch.cat([out, torch.tensor([[5, 6, 7]])], 1)
    dyn = DynamicCache(config=model.config)
    expected = run(model, inputs, dyn, compiled=False, do_sample=False)
    expected = run(model, {"input_ids": torch.cat([expected, torch.tensor([[5, 6, 7]])], 1)}, dyn, compiled=False,
                   new_tokens=4, do_sample=False)
    got = run(model, {"input_ids": more}, cache, compiled=True, new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


def test_beam_search_over_frozen_layers():
    """transformers does not compile beam search; it runs eagerly over the frozen layers, which move
    their rows in place at every reorder: the beams of a DynamicCache with ``full``."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([30, 24])
    settings = dict(num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True)
    expected = run(model, inputs, DynamicCache(config=model.config), compiled=False, **settings)
    cache = kvpolicy.make_cache("full", compiled_decode=True)
    got = run(model, inputs, cache, compiled=True, **settings)
    assert cache.is_frozen()
    assert torch.equal(got, expected)
    eager = kvpolicy.make_cache("pyramidinfer", compiled_decode=False, **POLICIES["pyramidinfer"])
    frozen = kvpolicy.make_cache("pyramidinfer", compiled_decode=True, **POLICIES["pyramidinfer"])
    assert torch.equal(run(model, inputs, frozen, compiled=True, **settings),
                       run(model, inputs, eager, compiled=False, **settings))
    assert frozen.kv_tokens_per_layer() == eager.kv_tokens_per_layer()
