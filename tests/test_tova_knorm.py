"""TOVA and KNorm: registration, budgets, protected tokens, their selection rules against oracles computed
here from what the model produced, and the compiled decode path against the eager one.

Oracles. KNorm: the key norms come from the keys the model handed the cache (a plain ``DynamicCache``
prompt forward, or a spy on ``cache.update`` while decoding), not from kvpolicy's buffers. TOVA: the
attention of the newest query comes from transformers' own eager attention (``output_attentions``):
over the prompt for the prefill selection, and for a decode step over a ``DynamicCache`` holding exactly
the kept tokens (``test_oracle``'s route). A selection is right when each row and head keeps its budget,
its sinks and recent window, and no evicted token scores above a kept one (within ``SCORE_TOL``, as the
two routes sum the same float32 numbers in other orders).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from models import batch, greedy, tiny_model
from test_compiled_generate import compiled_and_eager
from test_oracle import Run, llama, oracle_step
from transformers import DynamicCache

import kvpolicy
from kvpolicy import ConfigError, make_cache, make_policy
from kvpolicy.core import registry
from kvpolicy.policies import BUILTIN_POLICIES, KnormConfig, KnormPolicy, TOVAConfig, TOVAPolicy

SCORE_TOL = 1e-5
LENGTHS = [40, 25, 33]  # left-padded: pads 0, 15, 7
CLASSES = {"tova": (TOVAPolicy, TOVAConfig), "knorm": (KnormPolicy, KnormConfig)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def decode(model, cache, inputs, steps: int, each=None):
    """Prefill ``inputs`` then greedy-decode ``steps`` tokens one forward at a time; ``each(step)`` is
    called after the prefill (step 0) and after every decode step."""
    mask = inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(**inputs, position_ids=position_ids, past_key_values=cache, use_cache=True)
        if each:
            each(0)
        for step in range(1, steps + 1):
            token = out.logits[:, -1:].argmax(-1)
            position_ids = position_ids[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                        use_cache=True)
            if each:
                each(step)


def protected(seen: int, keep: int, sinks: int, window: int) -> set[int]:
    """The row-local positions a budgeted plan must keep: the window first, then the sinks that still fit."""
    recent = min(window, keep)
    return set(range(min(sinks, keep - recent))) | set(range(seen - recent, seen))


def assert_top_scored(kept: set[int], scores: dict[int, float], keep: int, must: set[int], where: str):
    """``kept`` is ``keep`` tokens: ``must``, then the highest ``scores`` among the others (ties within
    SCORE_TOL either way)."""
    assert len(kept) == keep, f"{where}: kept {len(kept)} tokens, budget {keep}"
    assert must <= kept, f"{where}: lost protected tokens {sorted(must - kept)}"
    assert kept <= set(scores), f"{where}: kept {sorted(kept - set(scores))}, which were not candidates"
    chosen = [scores[p] for p in kept - must]
    evicted = [scores[p] for p in set(scores) - kept]
    if chosen and evicted:
        assert min(chosen) >= max(evicted) - SCORE_TOL, f"{where}: evicted a token scoring above a kept one"


def kept_set(cache, layer: int, row: int, head: int) -> set[int]:
    pos = cache.kept_positions(layer)[row, head]
    return set(pos[pos >= 0].tolist())


# ------------------------------------------------------------------------------- registration


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_listed_registered_as_a_plugin_and_built_by_name(name):
    policy_class, config_class = CLASSES[name]
    assert name in kvpolicy.available_policies()
    assert policy_class in BUILTIN_POLICIES
    hooked = [cls for classes in registry.plugin_manager().hook.kvpolicy_policies() for cls in classes]
    assert policy_class in hooked, "registered through the kvpolicy.policies hook"
    cache = make_cache(name, budget=9, sink_size=1, window_size=2)
    assert isinstance(cache.policy, policy_class) and isinstance(cache.policy.config, config_class)
    assert (cache.policy.config.budget, cache.policy.config.sink_size, cache.policy.config.window_size) == (9, 1, 2)
    assert make_cache(name, compression_ratio=0.3).policy.config.compression_ratio == 0.3
    assert isinstance(make_policy(config_class(budget=5)), policy_class)
    assert kvpolicy.PolicyCache(name, budget=5).policy.config.budget == 5
    for bad in (dict(compression_ratio=1.0), dict(budget=0), dict(window_size=-1), dict(unknown=1)):
        with pytest.raises(ConfigError):
            make_cache(name, **bad)


def test_defaults():
    tova = TOVAConfig()
    assert (tova.sink_size, tova.window_size, tova.compress, tova.evict_every) == (0, 1, "both", 1)
    assert TOVAPolicy.shared_positions
    knorm = KnormConfig()
    assert (knorm.sink_size, knorm.window_size, knorm.compress, knorm.skip_layers) == (0, 0, "prefill", ())
    assert make_cache("knorm", skip_layers=[0, 1]).policy.config.skip_layers == (0, 1)


# ------------------------------------------------------------------------------- budgets (hypothesis)


@settings(max_examples=60)
@example(policy="tova", lengths=LENGTHS, budget=12, sinks=2, window=3, steps=8, compress="both", evict_every=1)
@example(policy="tova", lengths=LENGTHS, budget=9, sinks=0, window=0, steps=8, compress="both", evict_every=3)
@example(policy="knorm", lengths=LENGTHS, budget=12, sinks=2, window=3, steps=8, compress="both", evict_every=1)
@example(policy="knorm", lengths=LENGTHS, budget=10, sinks=1, window=2, steps=8, compress="both", evict_every=2)
@example(policy="knorm", lengths=LENGTHS, budget=10, sinks=1, window=2, steps=4, compress="prefill", evict_every=1)
@given(
    policy=st.sampled_from(sorted(CLASSES)),
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3),
    budget=st.integers(1, 50),
    sinks=st.integers(0, 5),
    window=st.integers(0, 8),
    steps=st.integers(0, 6),
    compress=st.sampled_from(["both", "prefill"]),
    evict_every=st.integers(1, 3),
)
def test_budget_never_exceeded_and_protected_tokens_kept(policy, lengths, budget, sinks, window, steps, compress,
                                                         evict_every):
    """After the prompt no layer holds more than ``budget`` tokens a row; while decoding, a policy that
    re-selects every token stays at the budget, one that re-selects every ``evict_every`` tokens exceeds
    it by fewer than ``evict_every``, and a prompt-only one grows one token a step; never more than the
    ``decode_growth`` the compiled path sizes its buffers with. Sinks and the recent window survive every
    compression; TOVA's heads all keep the same tokens."""
    model = tiny_model("llama", "sdpa")
    cache = make_cache(policy, budget=budget, sink_size=sinks, window_size=window, compress=compress,
                       evict_every=evict_every, compiled_decode=False)
    check = budget_checker(cache, lengths, budget, sinks, window, compress, evict_every,
                           one_set_per_layer=policy == "tova")
    decode(model, cache, batch(lengths), steps, check)


def budget_checker(cache, lengths: list[int], budget: int, sinks: int, window: int, compress: str, evict_every: int,
                   one_set_per_layer: bool = False):
    """A ``check(step)`` for :func:`decode`: no row over ``budget`` after the prompt; while decoding a
    prompt-only cache grows one token a step and a re-compressing one stays within ``evict_every - 1`` of
    the budget, never past ``decode_growth``; sinks and the window kept in every head."""
    after_prefill: list[list[int]] = []

    def check(step: int):
        counts = cache.valid_tokens_per_layer()
        if step == 0:
            after_prefill.extend(counts)
        for layer, per_row in enumerate(counts):
            pos = cache.kept_positions(layer)
            growth = cache.policy.decode_growth(layer, lengths, step)
            for row, n in enumerate(lengths):
                seen = n + step
                bound = budget + step if step == 0 or compress == "prefill" else budget + evict_every - 1
                assert per_row[row] <= min(bound, seen), f"layer {layer} row {row} step {step}: {per_row[row]}"
                assert per_row[row] <= after_prefill[layer][row] + growth, "decode_growth is not an upper bound"
                must = protected(seen, min(budget, seen), sinks, window)
                for head in range(pos.shape[1]):
                    kept = [p for p in pos[row, head].tolist() if p >= 0]
                    assert kept == sorted(set(kept)) and len(kept) == per_row[row]
                    assert must <= set(kept), f"layer {layer} row {row} head {head}: lost {must - set(kept)}"
                if one_set_per_layer:
                    assert torch.equal(pos[row], pos[row, :1].expand_as(pos[row])), "one token set per layer"

    return check


@given(lengths=st.lists(st.integers(5, 60), min_size=1, max_size=3), ratio=st.floats(0.0, 0.8),
       steps=st.integers(0, 4))
def test_knorm_skip_layers_stay_whole_and_the_others_keep_their_share(lengths, ratio, steps):
    model = tiny_model("llama", "sdpa")
    cache = make_cache("knorm", compression_ratio=ratio, compress="both", skip_layers=[0, 2], compiled_decode=False)
    decode(model, cache, batch(lengths), steps)
    for layer, counts in enumerate(cache.valid_tokens_per_layer()):
        seen = [n + steps for n in lengths]
        expected = seen if layer in (0, 2) else [s - int(s * ratio) for s in seen]
        assert counts == expected, f"layer {layer}"


# ------------------------------------------------------------------------------- generous budgets


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("settings", [dict(budget=60), dict(compression_ratio=0.0), dict(budget=50, compress="both",
                                                                                         window_size=0)],
                         ids=["budget", "ratio0", "both"])
def test_generous_budget_gives_exactly_the_full_policys_tokens(name, settings):
    assert_same_as_full(name, settings)


def assert_same_as_full(policy: str, settings: dict):
    """``policy`` with ``settings`` evicts nothing on the tiny model's :data:`LENGTHS` rows over 10 greedy
    tokens: the same tokens and kept positions as ``full``. Returns ``(cache, full)`` for further checks."""
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS)
    full = make_cache("full")
    expected = greedy(model, inputs, full, new_tokens=10)
    cache = make_cache(policy, **settings)
    assert torch.equal(greedy(model, inputs, cache, new_tokens=10), expected)
    assert cache.valid_tokens_per_layer() == full.valid_tokens_per_layer() == [[49, 34, 42]] * 4
    for layer in range(4):
        assert torch.equal(cache.kept_positions(layer), full.kept_positions(layer))
    return cache, full


# ------------------------------------------------------------------------------- KNorm's oracle


@pytest.mark.parametrize("settings", [dict(compression_ratio=0.5), dict(compression_ratio=0.6, sink_size=2,
                                                                        window_size=3), dict(budget=12)],
                         ids=["defaults", "sinks-window", "budget"])
def test_knorm_keeps_exactly_the_lowest_norm_keys_of_the_prompt(settings):
    """The keys of a plain ``DynamicCache`` forward of the same prompt (kvpolicy compresses a layer after
    its attention, so the prompt's keys are the same): each row and KV head keeps its protected tokens
    and then its lowest-norm keys, nothing else."""
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, past_key_values=plain)
        cache = make_cache("knorm", **settings)
        model(**inputs, past_key_values=cache)
    width = max(LENGTHS)
    knorm = KnormConfig(**settings)
    for layer in range(4):
        norms = torch.linalg.vector_norm(plain.layers[layer].keys.double(), dim=-1)  # [B, H_kv, width]
        for row, n in enumerate(LENGTHS):
            keep = knorm.budget if knorm.budget is not None else n - int(n * knorm.compression_ratio)
            must = protected(n, keep, knorm.sink_size, knorm.window_size)
            for head in range(norms.shape[1]):
                scores = {p: -norms[row, head, width - n + p].item() for p in range(n)}
                kept = kept_set(cache, layer, row, head)
                # exactly the lowest norms up to ties, which are real: in layer 0 a token repeated in the
                # prompt has keys of one norm at both positions (RoPE only rotates them)
                assert_top_scored(kept, scores, keep, must, f"layer {layer} row {row} head {head}")
    assert any(kept_set(cache, layer, row, 0) != kept_set(cache, layer, row, 1) for layer in range(4)
               for row in range(len(LENGTHS))), "each KV head selects its own keys"


def test_knorm_decode_time_selection_follows_the_keys_the_model_produced():
    """``compress="both"``: at every decode step each head keeps its protected tokens and the lowest-norm
    keys among what it held plus the new token, norms taken from the keys the model handed
    ``cache.update`` (a spy); a skipped layer keeps everything."""
    model = tiny_model("llama", "sdpa")
    config = KnormConfig(budget=14, sink_size=1, window_size=2, compress="both", skip_layers=(0,))
    cache = make_cache("knorm", **config.model_dump(), compiled_decode=False)
    history: dict[int, list[torch.Tensor]] = {}
    update = cache.update

    def spy(key_states, value_states, layer_idx, *args, **kwargs):
        history.setdefault(layer_idx, []).append(key_states.detach().clone())
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = spy
    width = max(LENGTHS)
    before: dict[tuple[int, int, int], set[int]] = {}
    evictions = 0

    def check(step: int):
        nonlocal evictions
        for layer in range(4):
            keys = torch.cat(history[layer], dim=2).double()  # [B, H_kv, width + step, D]
            norms = torch.linalg.vector_norm(keys, dim=-1)
            for row, n in enumerate(LENGTHS):
                seen = n + step
                for head in range(keys.shape[1]):
                    kept = kept_set(cache, layer, row, head)
                    if layer in config.skip_layers:
                        assert kept == set(range(seen))
                        continue
                    candidates = set(range(seen)) if step == 0 else before[layer, row, head] | {seen - 1}
                    scores = {p: -norms[row, head, width - n + p].item() for p in candidates}
                    keep = min(config.budget, seen)
                    must = protected(seen, keep, config.sink_size, config.window_size)
                    assert_top_scored(kept, scores, keep, must, f"step {step} layer {layer} row {row} head {head}")
                    evictions += step > 0 and len(candidates) > len(kept)
                    before[layer, row, head] = kept

    decode(model, cache, batch(LENGTHS), 6, check)
    assert evictions, "nothing was evicted while decoding"


# ------------------------------------------------------------------------------- TOVA's oracle


@pytest.mark.parametrize("settings", [dict(compression_ratio=0.5), dict(budget=10, sink_size=2, window_size=4),
                                      dict(budget=7, window_size=0)], ids=["defaults", "sinks-window", "no-window"])
def test_tova_prefill_keeps_what_the_last_query_attends_to_most(settings):
    """The model's own eager attention weights of the prompt (``output_attentions``): the last query's
    row, averaged over every query head of the layer, ranks the tokens; all KV heads keep the same set."""
    model = llama(2, "eager")
    inputs = batch(LENGTHS)
    mask = inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(**inputs, position_ids=position_ids, past_key_values=DynamicCache(), output_attentions=True)
        cache = make_cache("tova", **settings)
        model(**inputs, position_ids=position_ids, past_key_values=cache)
    width = max(LENGTHS)
    tova = TOVAConfig(**settings)
    for layer, probs in enumerate(out.attentions):  # [B, H_q, Q, K]
        last = probs[:, :, -1].double().mean(dim=1)  # [B, K]: the newest query, every head averaged
        for row, n in enumerate(LENGTHS):
            keep = tova.budget if tova.budget is not None else n - int(n * tova.compression_ratio)
            must = protected(n, keep, tova.sink_size, tova.window_size)
            scores = {p: last[row, width - n + p].item() for p in range(n)}
            for head in range(model.config.num_key_value_heads):
                assert_top_scored(kept_set(cache, layer, row, head), scores, keep, must,
                                  f"layer {layer} row {row} head {head}")


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_tova_decode_step_keeps_what_the_new_query_attends_to_most(kv_heads):
    """Each decode step, from transformers' eager attention over a ``DynamicCache`` holding exactly the
    kept tokens and the new one (test_oracle's route, ``output_attentions``): the new query's weights,
    averaged over the query heads, rank the kept tokens and itself; the step evicts the lowest. The
    route's logits also equal the cache's (check_step's oracle, here for TOVA's layouts)."""
    model = llama(kv_heads, "eager")
    settings = dict(budget=16, sink_size=1, window_size=2)
    run = Run(model, ("tova", settings, True), lengths=LENGTHS)
    token = run.next_token
    for step in range(1, 4):
        kept = run.snapshot()
        out, _, _ = oracle_step(model, kept, token, run.seen, output_attentions=True)
        positions = list(run.seen)  # the new token's row-local position
        got = run.step(token)
        assert (got - out.logits[:, -1]).abs().max().item() <= 1e-5, f"step {step}: logits differ from the oracle's"
        for layer, (slots, probs) in enumerate(zip(kept, out.attentions)):  # probs: [B, H_q, 1, L + 1]
            weights = probs[:, :, 0].double().mean(dim=1)  # [B, L + 1]
            for row in range(len(LENGTHS)):
                local = slots.local[row, 0].tolist() + [positions[row]]
                scores = {p: weights[row, i].item() for i, p in enumerate(local) if p >= 0}
                seen = positions[row] + 1
                keep = min(settings["budget"], seen)
                must = protected(seen, keep, settings["sink_size"], settings["window_size"])
                for head in range(kv_heads):
                    assert_top_scored(kept_set(run.cache, layer, row, head), scores, keep, must,
                                      f"step {step} layer {layer} row {row} head {head}")
        token = got.argmax(-1)


# ------------------------------------------------------------------------------- compiled decode path

COMPILED = {
    "tova": ("tova", dict(budget=12)),
    "tova-ratio-every3": ("tova", dict(compression_ratio=0.5, sink_size=2, window_size=3, evict_every=3)),
    "knorm": ("knorm", dict(compression_ratio=0.5)),
    "knorm-both-skip": ("knorm", dict(budget=16, window_size=2, compress="both", skip_layers=[0])),
}


@pytest.mark.parametrize("case", sorted(COMPILED))
def test_compiled_generate_equals_the_eager_path(case, fresh_dynamo):
    """``generate`` through the compiled decode step over frozen layers (forced on the CPU with the
    ``eager`` dynamo backend, as in test_compiled_generate) gives the eager path's tokens and keeps the
    same positions; one graph, so the buffers sized by ``decode_growth`` never had to grow."""
    policy, settings = COMPILED[case]
    model = tiny_model("llama", "sdpa")
    cache, eager = compiled_and_eager(model, policy, settings)
    assert cache.valid_tokens_per_layer() == eager.valid_tokens_per_layer()
    assert cache.kv_tokens_per_layer()[-1] < 40 + 12, "the policy must have evicted something"
    for layer in range(len(cache.layers)):
        assert torch.equal(cache.kept_positions(layer), eager.kept_positions(layer))
