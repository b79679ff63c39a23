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
