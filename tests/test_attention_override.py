"""Another library overriding an attention function locally (as kvpress does) must not hide the
queries from kvpolicy."""

import torch
from models import batch, tiny_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import kvpolicy


def test_a_local_override_of_sdpa_is_wrapped_too():
    model = tiny_model("llama", "sdpa")
    inputs = batch([30, 24])
    settings = dict(compression_ratio=0.5, window_size=4)
    expected = model.generate(**inputs, past_key_values=kvpolicy.make_cache("snapkv", **settings), max_new_tokens=6,
                              do_sample=False, pad_token_id=0)
    original = AttentionInterface._global_mapping["sdpa"].__wrapped__
    calls = []

    def third_party_sdpa(module, query, key, value, *args, **kwargs):
        calls.append(module.layer_idx)
        return original(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = third_party_sdpa  # lands in the instance's local mapping
    try:
        cache = kvpolicy.make_cache("snapkv", **settings)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert calls, "the third-party function must still run"
    assert torch.equal(out, expected)
    assert max(map(max, cache.valid_tokens_per_layer())) < 36


def test_a_third_party_wrapper_around_the_wrapped_sdpa_is_not_wrapped_again():
    """kvpress imported after kvpolicy wraps the already-wrapped sdpa (its patch decorates whatever is
    registered). Wrapping that again ran the static decode step's attention, and so its slot
    bookkeeping, twice per layer (an index error at the end of the buffers)."""
    from kvpolicy.generation import generate_static

    model = tiny_model("llama", "sdpa")
    inputs = batch([30, 24])
    settings = dict(
        prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4, exceed_length_to_compress=4
    )
    expected = generate_static(model, **inputs, policy="pyramidinfer", max_new_tokens=12, compile=False, **settings)
    registered = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []

    def patch(func):  # kvpress's attention_patch: a plain closure, no functools.wraps
        def wrapper(module, query, key, value, *args, **kwargs):
            calls.append(module.layer_idx)
            return func(module, query, key, value, *args, **kwargs)

        return wrapper

    ALL_ATTENTION_FUNCTIONS["sdpa"] = patch(registered)
    try:
        out = generate_static(model, **inputs, policy="pyramidinfer", max_new_tokens=12, compile=False, **settings)
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert calls, "the third-party function must still run"
    assert torch.equal(out.sequences, expected.sequences)
    assert out.cache.kv_tokens_per_layer() == expected.cache.kv_tokens_per_layer()
