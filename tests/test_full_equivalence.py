"""With the ``full`` policy the cache must be invisible: the tokens of transformers' DynamicCache, and
bitwise the same logits at every step (a wrong position, mask or key shows in the logits long before
it flips a greedy token)."""

import pytest
import torch
from models import FAMILIES, attentions, batch, greedy, has_sliding_layers, tiny_model
from transformers import DynamicCache

from kvpolicy import FullCache, PolicyCache, cache_argument, make_cache

NEW = 16

#: transformers' own cache for a sliding-window config (``DynamicCache(config=...)``) keeps only the last
#: ``window - 1`` keys of a sliding layer, and so does the full policy (the cache frees what falls out of
#: the window: here, with the tiny window of 8, at every step): the same keys, bitwise the same logits. A
#: ``DynamicCache()`` without the config keeps every key and masks the old ones: attention then sums over
#: more terms, which is not bitwise the same. Worst measured difference on the Gemma families here:
#: 3.6e-7 (float32); bound with headroom.
KEEP_EVERYTHING_TOL = 1e-6

CASES = [
    pytest.param(family, attn, id=f"{family}-{attn}") for family in sorted(FAMILIES) for attn in attentions(family)
]


def generate_logits(model, inputs, cache, new_tokens: int = NEW):
    """Greedy ``generate`` keeping every step's logits (``out.sequences``, ``out.logits``)."""
    with torch.no_grad():
        return model.generate(**inputs, **{cache_argument(model): cache}, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)


def max_logit_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family,attn", CASES)
@pytest.mark.parametrize("lengths", [[23], [23, 14, 6]], ids=["batch1", "batch3-left-padded"])
def test_full_policy_matches_dynamic_cache(family, attn, lengths):
    model = tiny_model(family, attn)
    inputs = batch(lengths, seed=len(lengths))
    # transformers' default cache for the config (which, in a sliding layer, drops the keys that leave the
    # window, as the full policy does): bitwise the same arithmetic
    expected = generate_logits(model, inputs, DynamicCache(config=model.config))
    got = generate_logits(model, inputs, FullCache())
    assert torch.equal(expected.sequences, got.sequences)
    assert len(got.logits) == len(expected.logits) == NEW
    for step, (want, have) in enumerate(zip(expected.logits, got.logits)):
        assert torch.equal(want, have), f"step {step}: logits differ by up to {(want - have).abs().max().item():.3g}"
    if has_sliding_layers(family):  # a cache that keeps every key, the window applied by transformers' mask
        everything = generate_logits(model, inputs, DynamicCache())
        assert torch.equal(everything.sequences, got.sequences)
        assert max_logit_diff(everything.logits, got.logits) <= KEEP_EVERYTHING_TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_cache_counts_every_prompt_token(family):
    """The cache's idea of each row's padding and prompt, which masks of compressed layers, the
    static decode path and every policy's budget rely on, in every family (Gemma's layer 0 slides:
    its mask's last row hides every token before the window, which once read as padding)."""
    model = tiny_model(family, attentions(family)[-1])
    lengths = [23, 14, 6]  # longer than Gemma's tiny window (8)
    cache = FullCache()
    greedy(model, batch(lengths, seed=3), cache, new_tokens=2)
    assert cache.pad_host == [0, 9, 17]
    assert cache.seen_tokens() == [n + 1 for n in lengths]


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
