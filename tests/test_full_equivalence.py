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
    pos = cache.kept_positions(0)
    assert pos[0, 0].tolist() == list(range(24))
    assert pos[1, 0].tolist() == [-1] * 9 + list(range(15))


def test_policy_cache_is_a_transformers_cache():
    from transformers.cache_utils import Cache

    assert isinstance(PolicyCache(), Cache)
    assert isinstance(FullCache(), PolicyCache)
