"""A policy that keeps a different, known number of tokens in each layer: the cache must hold
exactly those counts and exactly those positions, at prefill and while decoding."""

import torch
from models import batch, greedy, tiny_model

from kvpolicy import CachePolicy, LayerView, Plan, PolicyCache

BUDGETS = [40, 25, 12, 7]


class KeepEvenFirst(CachePolicy):
    """Keeps ``BUDGETS[layer]`` tokens: even positions first, older first."""

    name = "toy_even"

    def plan(self, view: LayerView) -> Plan:
        local = view.positions.float()
        scores = -(local % 2) * 1e6 - local
        return Plan(keep=[BUDGETS[view.layer_idx]] * view.batch_size, scores=scores)


def expected_positions(seen: int, budget: int) -> list[int]:
    evens = [p for p in range(seen) if p % 2 == 0]
    odds = [p for p in range(seen) if p % 2 == 1]
    return sorted((evens + odds)[:budget])


def test_toy_policy_counts_and_positions():
    model = tiny_model("llama", "sdpa")
    lengths = [60, 45]
    inputs = batch(lengths)
    cache = PolicyCache(KeepEvenFirst())
    out = greedy(model, inputs, cache, new_tokens=10)
    assert out.shape == (2, 10)
    for layer, budget in enumerate(BUDGETS):
        assert cache.valid_tokens_per_layer()[layer] == [budget, budget]
        for row, n in enumerate(lengths):
            pos = cache.kept_positions(layer)[row]
            for head in range(pos.shape[0]):
                kept = [p for p in pos[head].tolist() if p >= 0]
                assert kept == expected_positions(n + 9, budget)
    assert cache.get_seq_length() == 60 + 9


def test_evicted_memory_is_released():
    model = tiny_model("llama", "sdpa")
    inputs = batch([200])
    full, toy = PolicyCache(), PolicyCache(KeepEvenFirst())
    greedy(model, inputs, full, new_tokens=2)
    greedy(model, inputs, toy, new_tokens=2)
    held = toy.memory_bytes_per_layer()
    assert all(a < b for a, b in zip(held, full.memory_bytes_per_layer()))
    assert held[0] > held[3]  # capacity follows each layer's own budget
    # slots in use are exactly the budget
    per_token = 2 * 2 * 16 * 4  # k+v, 2 kv heads, head_dim 16, float32
    assert toy.memory_bytes(allocated=False) == sum(BUDGETS) * per_token


def test_output_changes_when_tokens_are_evicted():
    """Guards against a cache that records evictions but still attends to everything."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([120])
    full = greedy(model, inputs, PolicyCache(), new_tokens=12)
    with torch.no_grad():
        a = model(**inputs, past_key_values=PolicyCache()).logits
        cache = PolicyCache(KeepEvenFirst())
        model(**inputs, past_key_values=cache)
        step = model(input_ids=full[:, :1], past_key_values=cache).logits
        ref_cache = PolicyCache()
        model(**inputs, past_key_values=ref_cache)
        ref_step = model(input_ids=full[:, :1], past_key_values=ref_cache).logits
    assert a.shape[1] == 120
    assert not torch.allclose(step, ref_step, atol=1e-4)
