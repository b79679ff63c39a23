"""Per-policy behaviour on tiny models: exact budgets, the pyramid, no-op when the budget is large."""

import pytest
import torch
from models import batch, greedy, tiny_model

from kvpolicy import PyramidCache, available_policies, make_cache, make_policy
from kvpolicy.policies.pyramidinfer import DEPTH_PRESETS, PyramidInferConfig, preset_for_depth
from kvpolicy.policies.schedule import decay_ratio

ALL = ["full", "pyramidinfer", "h2o", "streamingllm", "snapkv", "pyramidkv", "random"]


def prefill(policy: str, layers: int, n: int, **overrides):
    """A cache after one prompt of ``n`` tokens through a tiny ``layers``-layer Llama."""
    model = tiny_model("llama", "sdpa", layers=layers)
    cache = make_cache(policy, **overrides)
    with torch.no_grad():
        model(**batch([n]), past_key_values=cache)
    return cache


def test_builtin_policies_registered():
    assert set(ALL) <= set(available_policies())


@pytest.mark.parametrize("policy", ALL)
def test_generous_budget_generates_exactly_what_full_does(policy):
    model = tiny_model("llama", "sdpa")
    inputs = batch([40, 25, 31])
    full = greedy(model, inputs, make_cache("full"), new_tokens=10)
    if policy == "pyramidinfer":
        overrides = {"min_context_length": 10_000}  # a context never pruned
    elif policy == "full":
        overrides = {}
    else:
        overrides = {"budget": 60}  # above prompt + new tokens
    cache = make_cache(policy, **overrides)
    assert torch.equal(greedy(model, inputs, cache, new_tokens=10), full)
    assert cache.valid_tokens_per_layer()[0] == [49, 34, 40]


@pytest.mark.parametrize("policy", ["pyramidinfer", "h2o", "snapkv", "streamingllm", "random", "pyramidkv"])
def test_padded_row_matches_row_alone(policy):
    model = tiny_model("llama", "sdpa", layers=6)
    overrides = {"min_context_length": 4} if policy == "pyramidinfer" else {"compression_ratio": 0.5}
    inputs = batch([90, 64], seed=3)
    together = make_cache(policy, **overrides)
    out_together = greedy(model, inputs, together, new_tokens=20)
    alone_inputs = {k: v[1:, 90 - 64 :] for k, v in inputs.items()}
    alone = make_cache(policy, **overrides)
    out_alone = greedy(model, alone_inputs, alone, new_tokens=20)
    assert torch.equal(out_together[1], out_alone[0])
    for layer in range(6):
        kept_together = together.kept_positions(layer)[1]
        kept_alone = alone.kept_positions(layer)[0]
        for head in range(kept_alone.shape[0]):
            a = [p for p in kept_together[head].tolist() if p >= 0]
            b = [p for p in kept_alone[head].tolist() if p >= 0]
            assert a == b


def test_pyramidinfer_prefill_counts_follow_the_schedule():
    layers, n = 8, 300
    cache = prefill("pyramidinfer", layers, n, min_context_length=16)
    # window 1 + int(300 * 0.2) = 61 plus the context lengths 239, 239, 238, 234, 226, 214, 199, 182
    # worked out by hand in tests/test_schedules.py::test_pyramid_context_lengths_cosine_by_hand
    assert [row[0] for row in cache.valid_tokens_per_layer()] == [300, 300, 299, 295, 287, 275, 260, 243]
    # one token set per layer (reference behaviour): all KV heads keep the same positions
    pos = cache.kept_positions(layers - 1)[0]
    assert torch.equal(pos[0], pos[1])


def test_pyramidinfer_decode_compresses_in_groups():
    layers, n, group = 4, 100, 8
    model = tiny_model("llama", "sdpa", layers=layers)
    cache = make_cache("pyramidinfer", min_context_length=8, exceed_length_to_compress=group)
    greedy(model, batch([n]), cache, new_tokens=1)
    # prefill, by hand: window 1 + int(100 * 0.2) = 21, C_0 = 79; cosine r = 0.9 over 4 layers:
    # r_1 = 0.9 + 0.05 * (1 + cos(pi/4)) = 0.985355, r_2 = 0.95; C = 79, 79, int(77.84) = 77, int(73.15) = 73
    assert [row[0] for row in cache.valid_tokens_per_layer()] == [100, 100, 98, 94]
    steps = 2 * group + 3
    cache2 = make_cache("pyramidinfer", min_context_length=8, exceed_length_to_compress=group)
    greedy(model, batch([n]), cache2, new_tokens=steps + 1)
    # each group of 8 keeps max(int(8 * 0.9 * r_l), 1), gen decay 0.1 cosine: r_l = 0.1 + 0.45 (1 + cos(pi l / 4))
    # = 1, 0.868198, 0.55, 0.231802 -> int(7.2), int(6.25), int(3.96), int(1.67) = 7, 6, 3, 1 (deeper keeps fewer)
    assert [cache2.policy.group_keep(layer) for layer in range(layers)] == [7, 6, 3, 1]
    # 19 decode steps: groups fall due at steps 8 and 16 (79 + 8 + 21 = 108 = 100 + 8 tokens seen), so
    # layer l holds prefill + 19 - 2 * (8 - keep_l): 100 + 19 - 2, 100 + 19 - 4, 98 + 19 - 10, 94 + 19 - 14
    assert [row[0] for row in cache2.valid_tokens_per_layer()] == [117, 115, 107, 99]


@pytest.mark.parametrize("policy, overrides", [
    ("pyramidinfer", dict(min_context_length=8, exceed_length_to_compress=4, gen_query_window=8)),
    ("streamingllm", dict(budget=40, evict_every=3)),
])
def test_selection_once_per_row_equals_selection_per_head(policy, overrides, monkeypatch):
    """Policies whose heads share positions select on [B, 1, L]; the kept tokens and the greedy
    tokens must be those of the per-head selection, prefill and decode (padded rows included)."""
    model = tiny_model("llama", "sdpa", layers=3)
    inputs = batch([70, 52])
    shared = make_cache(policy, **overrides)
    assert shared.policy.shared_positions
    tokens_shared = greedy(model, inputs, shared, new_tokens=14)
    per_head = make_cache(policy, **overrides)
    monkeypatch.setattr(type(per_head.policy), "shared_positions", False)
    tokens_per_head = greedy(model, inputs, per_head, new_tokens=14)
    assert torch.equal(tokens_shared, tokens_per_head)
    for layer in range(3):
        assert torch.equal(shared.kept_positions(layer), per_head.kept_positions(layer))


def test_pyramidinfer_kv_head_aggregation_selects_per_head():
    cache = prefill("pyramidinfer", 4, 200, min_context_length=8, head_aggregation="kv_head")
    pos = cache.kept_positions(3)[0]
    assert not torch.equal(pos[0], pos[1])


def test_pyramid_cache_default_picks_preset_by_depth():
    model = tiny_model("llama", "sdpa", layers=4)
    cache = PyramidCache()
    greedy(model, batch([20]), cache, new_tokens=2)
    assert cache.policy.preset_name == "pyramidinfer_llama2_7b"
    assert preset_for_depth(40)[0] == "pyramidinfer_llama2_13b"
    assert preset_for_depth(80)[0] == "pyramidinfer_llama2_70b"
    assert PyramidCache(prefill_decay_ratio=0.5).policy.auto is False


@pytest.mark.parametrize("_max_layers, preset, values", DEPTH_PRESETS)
def test_depth_presets_match_the_preset_files(_max_layers, preset, values):
    from_file = make_policy(preset).config
    assert from_file == PyramidInferConfig(**values)


@pytest.mark.parametrize(
    "preset, decay, interval",
    [
        ("pyramidinfer_llama2_7b", 0.9, 1),
        ("pyramidinfer_llama3_8b", 0.9, 1),
        ("pyramidinfer_llama2_13b", 0.8, 2),
        ("pyramidinfer_llama2_70b", 0.9, 3),
        ("pyramidinfer_llama3_70b", 0.9, 3),
    ],
)
def test_reference_presets(preset, decay, interval):
    c = make_policy(preset).config
    assert (c.prefill_decay_ratio, c.layerwise_downsample_interval) == (decay, interval)
    assert (c.prefill_recent_ratio, c.min_context_length, c.streamingllm_sink_len, c.distance_weight) == (
        0.2, 64, 4, 1.2
    )
    assert (c.gen_recent_ratio, c.gen_decay_ratio, c.exceed_length_to_compress) == (0.2, 0.1, 16)
    assert c.prefill_decay_strategy == c.gen_decay_strategy == "cosine"


@pytest.mark.parametrize(
    "n, ratio, expected",
    [
        # SnapKV's mean 200 - int(100) = 100; floor window 32 + sinks 4 = 36; bottom 2 * 100 - 36 = 164, step
        # 128 / 5 = 25.6: 164, 138.4, 112.8, 87.2, 61.6, 36 rounded (tests/test_schedules.py, no clipping)
        (200, 0.5, [164, 138, 113, 87, 62, 36]),
        # mean 150 - int(37.5) = 113: 190, 159, 128, 98, 67, 36, of which 190 and 159 exceed the 150 tokens
        # seen; their surplus 49 is spread over the other layers (worked out in tests/test_schedules.py)
        (150, 0.25, [150, 150, 141, 110, 79, 48]),
    ],
)
def test_pyramidkv_budgets_are_pyramidal_with_the_snapkv_mean(n, ratio, expected):
    layers = 6
    cache = prefill("pyramidkv", layers, n, compression_ratio=ratio)
    counts = [row[0] for row in cache.valid_tokens_per_layer()]
    assert counts == expected  # sums 600 and 678: SnapKV's mean budget per layer, even where a layer is clipped


def test_h2o_keeps_the_heaviest_hitters():
    """Against an independent recomputation of accumulated attention on a one-layer model."""
    model = tiny_model("llama", "eager", layers=1)
    n, budget = 40, 12
    inputs = batch([n])
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    attn = out.attentions[0][0]  # [Hq, n, n]
    acc = attn.reshape(2, 2, n, n).mean(1).sum(1)  # GQA groups averaged, summed over queries
    cache = make_cache("h2o", budget=budget, sink_size=0, window_size=0)
    with torch.no_grad():
        model(**inputs, past_key_values=cache)
    for head in range(2):
        kept = cache.kept_positions(0)[0, head].tolist()
        assert kept == sorted(acc[head].topk(budget).indices.tolist())


def test_decay_schedule_endpoints():
    assert decay_ratio(0, 32, 0.9, "cosine") == 1.0
    assert decay_ratio(16, 32, 0.5, "cosine") == pytest.approx(0.75)
    assert decay_ratio(16, 32, 0.5, "linear") == pytest.approx(0.75)
    assert decay_ratio(8, 32, 0.5, "linear") == pytest.approx(0.875)
    assert decay_ratio(31, 32, 0.7, "constant") == 0.7


@pytest.mark.parametrize("prompt", [600, 1700, 4000])
def test_min_context_ratio_floors_every_layer_and_keeps_the_reduction_length_independent(prompt):
    policy = make_policy("pyramidinfer_54_floor")
    policy.setup(30, [True] * 30)
    window = policy.recent_window(prompt, policy.config.prefill_recent_ratio)
    context = prompt - window
    budgets = policy.context_budgets(context)
    assert min(budgets) >= int(0.24 * context)
    assert budgets == sorted(budgets, reverse=True)
    reduction = 1 - sum(b + window for b in budgets) / (30 * prompt)
    assert 0.52 <= reduction <= 0.56
    reference_floor = make_policy("pyramidinfer_54_floor", min_context_ratio=0.0)
    reference_floor.setup(30, [True] * 30)
    assert reference_floor.context_budgets(context)[-1] < budgets[-1]
