"""With the ``full`` policy the cache must be invisible: same tokens as transformers' DynamicCache."""

import pytest
import torch
from transformers import DynamicCache

from kvpolicy import FullCache, PolicyCache, make_cache
from models import FAMILIES, batch, greedy, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lengths", [[23], [23, 14, 6]], ids=["batch1", "batch3-left-padded"])
def test_full_policy_matches_dynamic_cache(family, attn, lengths):
    model = tiny_model(family, attn)
    inputs = batch(lengths, seed=len(lengths))
    expected = greedy(model, inputs, DynamicCache(config=model.config), new_tokens=16)
    got = greedy(model, inputs, FullCache(), new_tokens=16)
    assert torch.equal(expected, got)


def test_full_cache_reports_true_length_and_positions():
    model = tiny_model("llama", "sdpa")
    inputs = batch([20, 11])
    cache = make_cache("full")
    greedy(model, inputs, cache, new_tokens=5)
    # 20 prompt columns + 4 fed-back tokens (the 5th is never fed): transformers counts pads too
    assert cache.get_seq_length() == 24
    assert cache.valid_tokens_per_layer() == [[24, 15]] * 4
    assert cache.seen_tokens() == [24, 15]
    pos = cache.kept_positions(0)
    assert pos[0, 0].tolist() == list(range(24))
    assert pos[1, 0].tolist() == [-1] * 9 + list(range(15))


def test_policy_cache_is_a_transformers_cache():
    from transformers.cache_utils import Cache

    assert isinstance(PolicyCache(), Cache)
    assert isinstance(FullCache(), PolicyCache)


def test_beam_search_matches_dynamic_cache():
    """reorder_cache works: beam search with the full policy equals transformers' own cache."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([18, 11])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, past_key_values=DynamicCache(config=model.config), **kwargs)
        got = model.generate(**inputs, past_key_values=FullCache(), **kwargs)
    assert torch.equal(expected, got)


def test_beam_search_with_compression_runs_and_keeps_budget():
    model = tiny_model("llama", "sdpa")
    cache = make_cache("h2o", budget=10)
    with torch.no_grad():
        model.generate(**batch([30, 20]), past_key_values=cache, max_new_tokens=5, num_beams=2, pad_token_id=0)
    assert all(count == 10 for row in cache.valid_tokens_per_layer() for count in row)


def test_make_cache_from_config_objects():
    from kvpolicy.policies.simple import StreamingLLMConfig

    cache = make_cache(StreamingLLMConfig(budget=8))
    assert cache.policy.name == "streamingllm"
