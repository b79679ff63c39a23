"""The static (compile-friendly) decode path gives exactly the tokens of the eager path."""

from __future__ import annotations

import pytest
import torch
from models import attentions, batch, tiny_model
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig

import kvpolicy
from kvpolicy.generation import generate_static
from kvpolicy.policies.simple import FullPolicy

NEW = 24
LENGTHS = [40, 33, 37]
PYRAMID = dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4, gen_recent_ratio=0.1,
               exceed_length_to_compress=4, gen_query_window=8)

#: the static path's logits against ``generate``'s (float32): not bitwise, because the prompt is
#: prefilled in row chunks (other matrix shapes) and a step attends over the whole static buffer,
#: empty slots masked (longer sums). Worst measured difference over these tests: 3.6e-7 (Gemma 3,
#: with the padding fix below), 2.6e-7 for the others; bound with headroom. A static step that skips
#: its query-ring write moved them by 7e-3 to 1.3e-2 while every token stayed the same.
STATIC_TOL = 1e-6


def eager(model, inputs, cache, new=NEW, **kwargs):
    """Greedy ``generate`` without an EOS (so no min_new_tokens logit masking either), every step's
    logits kept (``.sequences``, ``.logits``)."""
    return model.generate(**inputs, past_key_values=cache, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True, **kwargs)


def assert_same_logits(expected, got, tol=STATIC_TOL):
    assert got is not None and len(got) == len(expected)
    for step, (want, have) in enumerate(zip(expected, got)):
        assert want.shape == have.shape and have.dtype == torch.float32
        diff = (want - have).abs().max().item()
        assert diff <= tol, f"step {step}: logits differ by {diff:.3g} (> {tol:g})"


STATIC_FAMILIES = [
    pytest.param(family, attn, None, id=f"{family}-{attn}")
    for family in ["llama", "qwen3", "mistral", "phi3", "gemma2", "gemma3"] for attn in attentions(family)
] + [  # Gemma's softcapping, q/k norms and per-layer-type RoPE without the window cutting the text
    pytest.param(family, attn, 128, id=f"{family}-{attn}-window-wider-than-the-text")
    for family, attn in [("gemma2", "eager"), ("gemma3", "sdpa")]
]


@pytest.mark.parametrize("family,attn,window", STATIC_FAMILIES)
def test_full_static_equals_dynamic_cache(family, attn, window):
    model = tiny_model(family, attn, window=window)
    inputs = batch(LENGTHS, seed=1)
    expected = eager(model, inputs, DynamicCache())
    out = generate_static(model, **inputs, policy="full", max_new_tokens=NEW, prefill_batch_size=2, compile=False,
                          output_logits=True)
    assert torch.equal(out.sequences, expected.sequences)
    assert_same_logits(expected.logits, out.logits)


def test_sliding_window_layers_are_masked_like_transformers():
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=12, pad_token_id=0,
                           eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    inputs = batch(LENGTHS, seed=2)
    expected = eager(model, inputs, DynamicCache(config=config))
    out = generate_static(model, **inputs, policy="full", max_new_tokens=NEW, compile=False, output_logits=True)
    assert torch.equal(out.sequences, expected.sequences)
    # DynamicCache(config=...) drops keys that leave the window, the static buffer masks them: not bitwise
    assert_same_logits(expected.logits, out.logits)


@pytest.mark.parametrize(
    "policy,overrides",
    [
        ("pyramidinfer", PYRAMID),
        ("pyramidinfer", dict(PYRAMID, head_aggregation="kv_head", pool_kernel=3)),
        ("streamingllm", dict(compression_ratio=0.5, evict_every=4, window_size=8)),
        ("snapkv", dict(compression_ratio=0.5, window_size=8)),
        ("pyramidinfer", dict(PYRAMID, prefill_mode="prune_hidden")),
    ],
)
def test_compressing_policies_keep_the_same_tokens_as_the_eager_path(policy, overrides):
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS, seed=3)
    cache = kvpolicy.make_cache(policy, **overrides)
    expected = eager(model, inputs, cache)
    out = generate_static(model, **inputs, policy=policy, max_new_tokens=NEW, prefill_batch_size=2, compile=False,
                          output_logits=True, **overrides)
    assert torch.equal(out.sequences, expected.sequences)
    assert_same_logits(expected.logits, out.logits)
    assert out.cache.valid_tokens_per_layer() == cache.valid_tokens_per_layer()
    for layer in range(len(cache.layers)):
        kept, static = cache.kept_positions(layer), out.cache.kept_positions(layer)
        assert torch.equal(static[..., : kept.shape[-1]], kept)
        assert (static[..., kept.shape[-1] :] == -1).all()
    if policy == "pyramidinfer":  # decoding really evicted, and the buffers were sized tightly
        seen = len(cache.layers) * sum(cache.seen_tokens())
        assert sum(map(sum, cache.valid_tokens_per_layer())) < seen
        assert all(layer.capacity <= layer.length + 1 for layer in out.cache.layers[1:])


def test_compiled_step_is_one_graph_across_steps_and_calls():
    model = tiny_model("llama", "sdpa")
    counters.clear()
    for seed in (4, 5):
        inputs = batch(LENGTHS, seed=seed)
        expected = eager(model, inputs, kvpolicy.make_cache("pyramidinfer", **PYRAMID))
        out = generate_static(model, **inputs, policy="pyramidinfer", max_new_tokens=NEW,
                              compile={"backend": "eager", "fullgraph": True}, output_logits=True, **PYRAMID)
        assert torch.equal(out.sequences, expected.sequences)
        assert_same_logits(expected.logits, out.logits)
    assert counters["stats"]["unique_graphs"] == 1


def test_stops_at_eos_like_generate():
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS, seed=6)
    free = eager(model, inputs, DynamicCache()).sequences
    eos = int(free[0, inputs["input_ids"].shape[1] + 5])  # a token row 0 emits at step 6
    expected = model.generate(**inputs, past_key_values=DynamicCache(), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, eos_token_id=eos, output_logits=True, return_dict_in_generate=True)
    out = generate_static(model, **inputs, policy="full", max_new_tokens=NEW, eos_token_id=eos, compile=False,
                          output_logits=True)
    assert torch.equal(out.sequences, expected.sequences)
    assert_same_logits(expected.logits, out.logits)  # one per generated column, as generate keeps them


class TightFull(FullPolicy):
    name = "tight-full-test"

    def decode_growth(self, layer_idx, prompt_lens, new_tokens):
        return 3


def test_an_underestimated_growth_bound_resizes_the_layer_rather_than_writing_out_of_bounds():
    """A policy whose ``decode_growth`` is too small: the frozen layer fills up, and the next step
    gets a larger buffer (a graph re-recording on a GPU) instead of an index error or a lost token."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([20, 13])
    expected = eager(model, inputs, DynamicCache(), new=10)
    out = generate_static(model, **inputs, policy=lambda: kvpolicy.PolicyCache(TightFull()), max_new_tokens=10,
                          compile=False, output_logits=True)
    assert torch.equal(out.sequences, expected.sequences)
    assert all(layer.capacity >= 20 + 9 for layer in out.cache.layers)


def test_accumulated_attention_policies_decode_static_like_the_eager_path():
    """H2O scores every decode step: the static step adds the token's attention to the running
    scores inside the step (a fixed-shape softmax over the whole buffer)."""
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS)
    cache = kvpolicy.make_cache("h2o", budget=16)
    expected = eager(model, inputs, cache)
    out = generate_static(model, **inputs, policy="h2o", budget=16, max_new_tokens=NEW, compile=False,
                          output_logits=True)
    assert torch.equal(out.sequences, expected.sequences)
    assert_same_logits(expected.logits, out.logits)
    assert out.cache.kv_tokens_per_layer() == cache.kv_tokens_per_layer() == [16] * 4
    for layer in range(4):
        assert torch.equal(out.cache.kept_positions(layer), cache.kept_positions(layer))


def test_installed_wrapper_does_not_break_other_compiled_models():
    """Once kvpolicy has wrapped the attention functions, compiling a model that uses no PolicyCache
    (e.g. transformers' own static cache) must still give one graph."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([12])
    eager(model, inputs, kvpolicy.make_cache("full"), new=2)  # installs the wrapper
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=inputs["input_ids"], use_cache=False)
    assert torch.allclose(out.logits, model(input_ids=inputs["input_ids"], use_cache=False).logits)


def test_a_frozen_cache_takes_a_longer_input_by_thawing():
    """After static decoding, a forward of several tokens (a continued prompt) runs on the dynamic
    layer kind again, gives the logits a DynamicCache gives, and freezes the layers once more."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([20])
    out = generate_static(model, **inputs, policy="full", max_new_tokens=3, compile=False)
    dyn = DynamicCache()
    with torch.no_grad():
        model(input_ids=out.sequences[:, :-1], past_key_values=dyn)
        more = torch.tensor([[5, 6, 7]])
        want = model(input_ids=torch.cat([out.sequences[:, -1:], more], 1), past_key_values=dyn).logits
        got = model(input_ids=torch.cat([out.sequences[:, -1:], more], 1), past_key_values=out.cache).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert out.cache.get_seq_length() == 20 + 2 + 4
    assert out.cache.is_frozen(), "frozen again for the decode steps that follow"


def test_first_moved_slot():
    from kvpolicy.core.layers import first_moved_slot

    still = torch.arange(5).view(1, 1, 5).expand(2, 3, 5)
    assert int(first_moved_slot(still)) == 5
    moved = still.clone()
    moved[1, 2, 3:] = torch.tensor([4, 6])
    assert int(first_moved_slot(moved)) == 3
    assert int(first_moved_slot(torch.zeros(2, 3, 0, dtype=torch.long))) == 0
