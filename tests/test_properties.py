"""Invariants over random budgets, lengths and padding (hypothesis)."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from models import batch, tiny_model

from kvpolicy import make_cache

BUDGET_POLICIES = ["h2o", "streamingllm", "snapkv", "random"]


def run(cache, lengths, steps, seed=0):
    """Prefill a left-padded batch then decode ``steps`` tokens one by one (greedy)."""
    model = tiny_model("llama", "sdpa")
    inputs = batch(lengths, seed=seed)
    with torch.no_grad():
        out = model(**inputs, past_key_values=cache)
        mask = inputs["attention_mask"]
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache)
    return inputs


def check_layer_invariants(cache, lengths, steps, sinks, recent, budget):
    seen = [n + steps for n in lengths]
    assert cache.get_seq_length() == max(lengths) + steps
    for layer in range(len(cache.layers)):
        counts = cache.valid_tokens_per_layer()[layer]
        pos = cache.kept_positions(layer)
        for row, n in enumerate(seen):
            expected = min(budget(layer, n), n)
            assert counts[row] == expected
            for head in range(pos.shape[1]):
                kept = [p for p in pos[row, head].tolist() if p >= 0]
                assert len(kept) == expected
                assert kept == sorted(set(kept)), "positions sorted and unique"
                assert all(0 <= p < n for p in kept)
                r = min(recent, expected)
                s = min(sinks, expected - r)
                assert set(range(s)) <= set(kept), "sinks kept"
                assert set(range(n - r, n)) <= set(kept), "recent window kept"


@given(
    policy=st.sampled_from(BUDGET_POLICIES),
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    budget=st.integers(1, 80),
    sinks=st.integers(0, 6),
    window=st.integers(0, 12),
    steps=st.integers(0, 5),
)
def test_budget_never_exceeded_and_protected_tokens_kept(policy, lengths, budget, sinks, window, steps):
    overrides = dict(budget=budget, sink_size=sinks, window_size=window)
    if policy == "snapkv":
        overrides["compress"] = "both"
    cache = make_cache(policy, **overrides)
    run(cache, lengths, steps)
    check_layer_invariants(cache, lengths, steps, sinks, window, lambda layer, n: budget)


@given(
    ratio=st.floats(0.0, 0.6),
    lengths=st.lists(st.integers(20, 70), min_size=1, max_size=3),
    steps=st.integers(0, 4),
)
def test_ratio_keeps_the_promised_share(ratio, lengths, steps):
    cache = make_cache("h2o", compression_ratio=ratio, sink_size=2, window_size=4)
    run(cache, lengths, steps)
    check_layer_invariants(cache, lengths, steps, 2, 4, lambda layer, n: n - int(n * ratio))


@given(
    lengths=st.lists(st.integers(1, 100), min_size=1, max_size=3),
    steps=st.integers(0, 24),
    decay=st.floats(0.3, 1.0),
    min_ctx=st.integers(0, 40),
    group=st.integers(1, 20),
)
def test_pyramidinfer_pyramid_is_monotone_and_protects_sinks(lengths, steps, decay, min_ctx, group):
    cache = make_cache(
        "pyramidinfer",
        prefill_decay_ratio=decay,
        min_context_length=min_ctx,
        exceed_length_to_compress=group,
    )
    run(cache, lengths, steps)
    counts = cache.valid_tokens_per_layer()
    for row, n in enumerate(lengths):
        per_layer = [counts[layer][row] for layer in range(len(counts))]
        assert per_layer == sorted(per_layer, reverse=True), "pyramid non-increasing with depth"
        assert per_layer[0] <= n + steps
        window = min(n, 1 + int(n * 0.2))
        for layer in range(len(counts)):
            kept = [p for p in cache.kept_positions(layer)[row, 0].tolist() if p >= 0]
            assert kept == sorted(set(kept))
            context_kept = [p for p in kept if p < n - window]
            assert set(range(min(4, len(context_kept)))) <= set(kept), "sinks kept"
            assert set(range(n + steps - window, n + steps)) <= set(kept), "recent window kept"
