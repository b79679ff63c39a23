"""A new layer kind, added from outside kvpolicy's core (as docs/architecture.md says): a layer that stores
its keys in float32 for a bfloat16 model, passing the full-cache equality test; and the chooser's errors."""

import copy

import pytest
import torch
from models import batch, tiny_model
from transformers import DynamicCache

from kvpolicy import ConfigError, make_cache
from kvpolicy.core.layers import DynamicLayer, FrozenLayer


class Float32KeysLayer(DynamicLayer):
    """Keeps keys in float32 (values as given); attention reads them back in the model's dtype."""

    def stored(self, key_states, value_states):
        return key_states.float().contiguous(), value_states.contiguous()

    def append(self, key_states, value_states, positions=None, width=None):
        keys, values = super().append(key_states, value_states, positions, width)
        return keys.to(self.dtype), values


def generate(model, inputs, cache, new_tokens=12):
    with torch.no_grad():
        return model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def test_a_toy_kind_passes_the_full_cache_equality_test():
    model = copy.deepcopy(tiny_model("llama", "sdpa")).to(torch.bfloat16)
    inputs = batch([23, 14, 6], seed=3)
    expected = generate(model, inputs, DynamicCache(config=model.config))
    cache = make_cache("full", layer_kind=Float32KeysLayer, compiled_decode=False)
    got = generate(model, inputs, cache)
    assert all(type(layer) is Float32KeysLayer for layer in cache.layers)
    assert cache.layers[0].keys.dtype == torch.float32 and cache.layers[0].values.dtype == torch.bfloat16
    assert torch.equal(expected.sequences, got.sequences)
    for step, (want, have) in enumerate(zip(expected.logits, got.logits, strict=True)):
        assert torch.equal(want, have), f"step {step}: logits differ by up to {(want - have).abs().max().item():.3g}"


def test_a_toy_kind_compresses_and_freezes_back_to_itself():
    """A compressing policy over the toy kind evicts; a frozen decode over it thaws back to the toy kind
    (a float32 model here: the frozen kind stores the model's dtype)."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([40, 31], seed=4)
    cache = make_cache("snapkv", layer_kind=Float32KeysLayer, compiled_decode=True, budget=16, window_size=4)
    generate(model, inputs, cache, new_tokens=4)
    assert all(isinstance(layer, FrozenLayer) for layer in cache.layers)
    assert max(cache.kv_tokens_per_layer()) < 40
    cache.thaw()
    assert all(type(layer) is Float32KeysLayer for layer in cache.layers)


@pytest.mark.parametrize("kind, fix", [(int, "subclass of kvpolicy.core.layers.KVLayer"),
                                       (FrozenLayer, "give the growing kind")])
def test_a_wrong_layer_kind_is_refused_with_the_fix(kind, fix):
    with pytest.raises(ConfigError, match=fix):
        make_cache("full", layer_kind=kind)
