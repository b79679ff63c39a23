"""PyramidInfer with a target for the prompt's KV (``compression_ratio`` or ``budget``).

The removed share is always worked out here from the per-layer counts the policy reports
(``prefill_keep``) or the cache holds (``valid_tokens_per_layer``): ``1 - sum(kept) / (layers * n)``,
and what is reachable from the recent window and the floor alone, not from the solver.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import batch, greedy, tiny_model
from pydantic import ValidationError

import kvpolicy.policies.pyramidinfer as pyramidinfer_module
from kvpolicy import ConfigError, PyramidCache, make_cache, make_policy
from kvpolicy.evaluation.runner import takes_ratio
from kvpolicy.policies.pyramidinfer import RATIO_PRESET, PyramidInferConfig
from kvpolicy.policies.schedule import decay_ratio
from kvpolicy.policies.targets import CompressionTargetWarning

#: shapes from the presets (cosine, downsample intervals 1-3, a ratio floor, windows 2%-20%) and
#: the other decay strategies of kvpolicy/policies/schedule.py
SHAPES = [
    ("pyramidinfer_llama2_7b", {}),
    ("pyramidinfer_llama2_13b", {}),
    ("pyramidinfer_llama2_70b", {}),
    ("pyramidinfer_54", {}),
    ("pyramidinfer_54_floor", {}),
    ("pyramidinfer", dict(prefill_decay_strategy="linear", prefill_decay_ratio=0.2, prefill_recent_ratio=0.05)),
    ("pyramidinfer", dict(prefill_decay_strategy="constant", prefill_decay_ratio=0.7, min_context_length=16,
                          prefill_recent_ratio=0.1, layerwise_downsample_interval=2)),
]

#: shapes whose recent window and floor leave room for every target up to 0.8 at 512+ tokens
ROOMY_SHAPES = [
    ("pyramidinfer", dict(prefill_recent_ratio=0.05)),  # 7B reference shape with a 5% window
    ("pyramidinfer", dict(prefill_recent_ratio=0.02, prefill_decay_ratio=0.8, layerwise_downsample_interval=2)),
    ("pyramidinfer_54", dict(prefill_recent_ratio=0.05, min_context_length=32)),
    ("pyramidinfer", dict(prefill_decay_strategy="linear", prefill_decay_ratio=0.1, prefill_recent_ratio=0.05)),
    ("pyramidinfer", dict(prefill_decay_strategy="constant", prefill_decay_ratio=0.5, prefill_recent_ratio=0.05)),
]


def solved_policy(shape, layers, compressible=None, **target):
    name, overrides = shape
    policy = make_policy(name, **overrides, **target)
    policy.setup(layers, compressible or [True] * layers)
    return policy


def kept_per_layer(policy, n):
    """What the policy keeps of an ``n``-token prompt at each layer, asked layer by layer."""
    return [policy.prefill_keep(n)[layer] for layer in range(policy.num_layers)]


def removed_share(kept, n):
    return 1.0 - sum(kept) / (len(kept) * n)


def window_and_floor(config, n):
    """The recent window and the floor of an ``n``-token prompt, from the settings (docs' formulas)."""
    w = min(n, 1 + int(n * config.prefill_recent_ratio))
    context = n - w
    floor = min(context, max(config.min_context_length, int(config.min_context_ratio * context)))
    return w, context, floor


def target_kept(config, n, layers):
    """Prompt tokens the target lets all ``layers`` keep together."""
    if config.budget is not None:
        return min(config.budget, n) * layers
    return (1.0 - config.compression_ratio) * layers * n


def shrunk_window_and_floor(config, n, compressible):
    """docs/policies/pyramidinfer.md's order, worked out here: with ``m`` whole tokens per compressible layer
    left by the target, the floor shrinks first (to ``m - w``, not below 0), then the window (to ``m``, not
    below 1); each only when window + floor do not fit in ``m``."""
    w, _, floor = window_and_floor(config, n)
    layers, on = len(compressible), sum(compressible)
    m = int((target_kept(config, n, layers) - (layers - on) * n) / on + 1e-9)
    if w + floor <= m:
        return w, floor
    if w <= m:
        return w, m - w
    return max(1, m), 0


def most_removable(config, n, compressible):
    """Largest share removable at ``n``: every compressible layer down to one token, the others keep all."""
    return sum(compressible) / len(compressible) * (1.0 - 1 / n)


def profile(config, layers):
    """The pyramid's shape, compounded here from decay_ratio (docs' schedule, no rounding or floor)."""
    out, p = [1.0], 1.0
    for layer in range(layers - 1):
        if layer % config.layerwise_downsample_interval == 0:
            p *= decay_ratio(layer, layers, config.prefill_decay_ratio, config.prefill_decay_strategy)
        out.append(p)
    return out


def check_solved(policy, n, target):
    """The target met (window and floor shrunk where they do not fit, or every compressible layer at one
    token where even that is too much), the pyramid non-increasing, its shape kept."""
    config, layers = policy.config, policy.num_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionTargetWarning)  # tests of the warning are below
        kept = kept_per_layer(policy, n)
    got = removed_share(kept, n)
    reachable = most_removable(config, n, policy.compressible)
    if target <= reachable:
        assert abs(got - target) <= 0.01, (got, target)
    else:  # out of reach at this length: every compressible layer keeps one token, and recorded
        assert got == pytest.approx(reachable, abs=1e-12)
    assert policy.solved[n] == pytest.approx(got, abs=1e-12)
    on = [k for k, c in zip(kept, policy.compressible) if c]
    assert on == sorted(on, reverse=True), "pyramid non-increasing with depth"
    w, floor = shrunk_window_and_floor(config, n, policy.compressible)
    assert policy.kept_window(n) == w
    assert min(on) >= w + floor, "no layer below its (shrunk) window and floor"
    # shape kept: every layer strictly between its floor and the whole prompt holds the same multiple of
    # the profile, to within rounding (and layers of equal share, e.g. between downsampled layers, equal)
    shape = profile(config, layers)
    free = [layer for layer in range(layers) if policy.compressible[layer] and w + floor < kept[layer] < n]
    for layer in free:
        first = free[0]
        assert abs((kept[layer] - w) - (kept[first] - w) * shape[layer] / shape[first]) < 2.0
    for a, b in zip(free, free[1:]):
        if shape[a] == shape[b]:
            assert kept[a] == kept[b]
    return got


# ----------------------------------------------------------------------------- the solver, no model


@settings(max_examples=150)
@given(
    shape=st.sampled_from(SHAPES),
    n=st.integers(512, 8192),
    layers=st.integers(12, 80),
    ratio=st.floats(0.3, 0.8),
)
def test_ratio_met_within_a_point_or_clipped_to_what_is_reachable(shape, n, layers, ratio):
    policy = solved_policy(shape, layers, compression_ratio=ratio)
    check_solved(policy, n, ratio)


@settings(max_examples=150)
@given(
    shape=st.sampled_from(ROOMY_SHAPES),
    n=st.integers(512, 8192),
    layers=st.integers(12, 80),
    ratio=st.floats(0.3, 0.8),
)
def test_every_target_up_to_080_is_met_when_window_and_floor_leave_room(shape, n, layers, ratio):
    policy = solved_policy(shape, layers, compression_ratio=ratio)
    assert most_removable(policy.config, n, policy.compressible) >= 0.8
    got = check_solved(policy, n, ratio)
    assert abs(got - ratio) <= 0.01


@settings(max_examples=60)
@given(shape=st.sampled_from(SHAPES), n=st.integers(512, 8192), layers=st.integers(12, 80), data=st.data())
def test_budget_is_the_mean_kept_per_layer(shape, n, layers, data):
    budget = data.draw(st.integers(n // 5, n))
    policy = solved_policy(shape, layers, budget=budget)
    target = 1.0 - budget / n
    check_solved(policy, n, target)
    if target <= most_removable(policy.config, n, policy.compressible):
        assert abs(sum(kept_per_layer(policy, n)) / layers - budget) <= 0.01 * n


@pytest.mark.filterwarnings("ignore::kvpolicy.policies.targets.CompressionTargetWarning")  # few layers compress
@settings(max_examples=40)
@given(
    n=st.integers(512, 4096),
    layers=st.integers(12, 40),
    ratio=st.floats(0.3, 0.6),
    data=st.data(),
)
def test_layers_not_compressed_count_as_keeping_everything(n, layers, ratio, data):
    """A layer the adapter marks not compressible keeps the whole prompt; the target is over all layers,
    so the others remove more."""
    compressible = data.draw(st.lists(st.booleans(), min_size=layers, max_size=layers).filter(lambda c: sum(c) >= 2))
    policy = solved_policy(("pyramidinfer", dict(prefill_recent_ratio=0.05)), layers, compressible,
                           compression_ratio=ratio)
    kept = kept_per_layer(policy, n)
    assert all(k == n for k, c in zip(kept, compressible) if not c)
    check_solved(policy, n, ratio)


def test_window_and_floor_shrink_for_a_target_they_do_not_fit_by_hand():
    """7B shape on 32 layers, 512 tokens at 0.8: the target leaves 0.2 * 512 = 102.4 tokens per layer, where the
    window (1 + int(512 * 0.2) = 103) and the floor (64) would keep 167. The floor goes first, then the window
    shrinks to 102; the 32 * 102.4 - 32 * 102 = 12.8 tokens left go to the layers of most context (the first)."""
    policy = solved_policy(("pyramidinfer_llama2_7b", {}), 32, compression_ratio=0.8)
    kept = kept_per_layer(policy, 512)
    assert policy.kept_window(512) == 102 and min(kept) == 102
    assert sum(kept) - 32 * 102 in (12, 13)
    assert kept == sorted(kept, reverse=True) and kept[0] > 102
    assert policy.solved[512] == pytest.approx(1 - sum(kept) / (32 * 512)) == pytest.approx(0.8, abs=1e-3)
    assert policy.recent_window(512, policy.config.prefill_recent_ratio) == 103  # the voters stay 103


def test_only_the_floor_shrinks_when_the_window_fits_by_hand():
    """7B shape on 32 layers, 512 tokens at 0.7: 0.3 * 512 = 153.6 tokens per layer hold the window (103) but not
    window + floor (167): the floor shrinks to 153 - 103 = 50, the window stays."""
    policy = solved_policy(("pyramidinfer_llama2_7b", {}), 32, compression_ratio=0.7)
    kept = kept_per_layer(policy, 512)
    assert policy.kept_window(512) == 103 and min(kept) >= 153
    assert abs(removed_share(kept, 512) - 0.7) <= 0.01


def test_a_target_out_of_reach_warns_with_what_was_removed():
    """Three tokens at 0.8 on 4 layers: every layer keeps at least one, so 2/3 is the most that can go."""
    policy = solved_policy(("pyramidinfer", {}), 4, compression_ratio=0.8)
    with pytest.warns(CompressionTargetWarning, match=r"removed 66\.7% of a 3-token prompt's KV instead of the 80\.0%"):
        assert kept_per_layer(policy, 3) == [1, 1, 1, 1]


def test_no_target_keeps_the_reference_schedule():
    for shape in SHAPES:
        policy = solved_policy(shape, 32)
        w, context, _ = window_and_floor(policy.config, 1000)
        assert kept_per_layer(policy, 1000) == [b + w for b in policy.context_budgets(context)]
        assert policy.solved == {}


def test_ratio_and_budget_together_rejected_naming_the_fix():
    with pytest.raises(ConfigError, match="give one: compression_ratio .* or budget"):
        make_policy("pyramidinfer", compression_ratio=0.5, budget=200)
    with pytest.raises(ValidationError, match="give one"):
        PyramidInferConfig(compression_ratio=0.5, budget=200)
    with pytest.raises(ConfigError, match="compression_ratio"):
        make_policy("pyramidinfer", compression_ratio=1.0)
    with pytest.raises(ConfigError, match="budget"):
        make_policy("pyramidinfer", budget=0)


def test_sweeps_set_the_ratio_of_every_policy_that_takes_one():
    """``compare --ratio`` sets PyramidInfer's ratio too (issue #26: it used to run its own schedule)."""
    assert takes_ratio("h2o") and takes_ratio("pyramidinfer") and not takes_ratio("full")


# ----------------------------------------------------------------------------- on a model


def prefill(cache, lengths, layers=12, seed=0):
    model = tiny_model("llama", "sdpa", layers=layers)
    with torch.no_grad():
        model(**batch(lengths, seed=seed), past_key_values=cache)
    return cache


def cache_removed_share(cache, row, n):
    """Share of row ``row``'s ``n`` prompt tokens the cache does not hold, over all its layers (every
    layer of the tiny Llama is compressible, so every layer counts, each out of ``n``)."""
    kept = [counts[row] for counts in cache.valid_tokens_per_layer()]
    return removed_share(kept, n), kept


def test_make_cache_ratio_on_a_model_removes_half_of_the_prompt():
    """12 layers, 300 tokens: the ratio form's shape (configs/pyramidinfer_ratio.yaml) scaled; 50% is within
    reach (its window and floor give way where they do not fit) and must be met."""
    cache = prefill(make_cache("pyramidinfer", compression_ratio=0.5), [300])
    got, kept = cache_removed_share(cache, 0, 300)
    assert abs(got - 0.5) <= 0.01
    assert kept == cache.policy.prefill_keep(300)
    assert cache.policy.solved[300] == pytest.approx(got)
    assert cache.policy.preset_name == RATIO_PRESET
    assert kept == sorted(kept, reverse=True) and kept[-1] < kept[0] < 300


def test_pyramid_cache_ratio_and_budget_on_a_model():
    cache = prefill(PyramidCache(compression_ratio=0.5), [300])
    assert abs(cache_removed_share(cache, 0, 300)[0] - 0.5) <= 0.01
    by_budget = prefill(PyramidCache(budget=150), [300])
    _, kept = cache_removed_share(by_budget, 0, 300)
    assert abs(sum(kept) / len(kept) - 150) <= 3  # one point of 300
    assert by_budget.policy.preset_name == RATIO_PRESET


def test_explicit_shape_with_a_ratio_is_not_replaced_by_the_depth_preset():
    cache = prefill(make_cache("pyramidinfer", compression_ratio=0.4, prefill_decay_ratio=0.5), [300])
    assert cache.policy.auto is False and cache.policy.config.prefill_decay_ratio == 0.5
    assert abs(cache_removed_share(cache, 0, 300)[0] - 0.4) <= 0.01


def test_each_row_of_a_padded_batch_meets_the_target_for_its_length():
    lengths = [300, 257]
    cache = prefill(make_cache("pyramidinfer", compression_ratio=0.45), lengths)
    for row, n in enumerate(lengths):
        assert abs(cache_removed_share(cache, row, n)[0] - 0.45) <= 0.01
    assert sorted(cache.policy.solved) == [257, 300]


def test_solved_once_per_prompt_length_not_per_layer(monkeypatch):
    calls = []
    solve = pyramidinfer_module.solve_context_scale

    def counting(*args, **kwargs):
        calls.append(args[0])
        return solve(*args, **kwargs)

    monkeypatch.setattr(pyramidinfer_module, "solve_context_scale", counting)
    cache = prefill(make_cache("pyramidinfer", compression_ratio=0.5), [300, 280, 300])
    assert len(calls) == 2  # two distinct lengths, 12 layers, 3 rows
    cache.policy.prefill_keep(300)
    assert len(calls) == 2


def test_a_ratio_beyond_window_and_floor_is_met_on_a_model():
    """0.9 at 300 tokens on the reference shape: 30 tokens per layer are left, less than the window (61) and
    floor (64): the floor goes, the window shrinks to 30, and every layer keeps its 30 newest tokens."""
    cache = prefill(make_cache("pyramidinfer_llama2_7b", compression_ratio=0.9), [300])
    got, kept = cache_removed_share(cache, 0, 300)
    assert kept == [30] * 12
    assert cache.policy.solved[300] == pytest.approx(got) == pytest.approx(0.9)
    assert sorted(cache.kept_positions(11)[0, 0].tolist()) == list(range(270, 300))


def test_prune_hidden_prefill_keeps_the_same_counts():
    cache_only = prefill(make_cache("pyramidinfer_llama2_7b", compression_ratio=0.5), [300])
    pruned = prefill(make_cache("pyramidinfer_llama2_7b", compression_ratio=0.5, prefill_mode="prune_hidden"), [300])
    assert pruned.valid_tokens_per_layer() == cache_only.valid_tokens_per_layer()


def test_decoding_after_a_solved_prefill_compresses_in_groups():
    """The target is about the prompt; generated tokens then follow the gen_* schedule as before."""
    model = tiny_model("llama", "sdpa", layers=12)
    cache = make_cache("pyramidinfer", compression_ratio=0.5, exceed_length_to_compress=4)
    greedy(model, batch([300]), cache, new_tokens=1 + 20)
    after = [row[0] for row in cache.valid_tokens_per_layer()]
    prompt = cache.policy.prefill_keep(300)
    # decode window 61, first group at 300 - 61 = 239: groups of 4 fall due after 4, 8, ..., 20 generated
    # tokens (5 groups), each keeping group_keep(layer) of its 4
    assert [a - p for a, p in zip(after, prompt)] == [20 - 5 * (4 - cache.policy.group_keep(layer))
                                                      for layer in range(12)]
    assert abs(cache.policy.solved[300] - 0.5) <= 0.01
