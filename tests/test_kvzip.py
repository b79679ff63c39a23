"""KVzip: registration, the reconstruction chunks, the scores against the model's own attention, the budget
shared across layers and heads, protections, a generous budget equal to ``full``, the routes that fill a
cache (``model(...)``, ``generate``, ``kvpolicy.prefill`` in row chunks, the compiled decode path) and the
errors of the routes that cannot score.

The oracle shares nothing with the policy's code path: for each row alone (no padding) the model's own
eager attention weights (``output_attentions``) of one forward over the prompt followed by a chunk's
reconstruction input give each reconstruction query's softmax; KVzip's softmax over the sinks, the chunk
and the input itself is that one renormalised over those keys. Scores (the largest weight any query of the
input and any query head of a group pays a prompt token) and the shared ranking are computed here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from models import batch, greedy, tiny_model
from test_compiled_generate import compiled_and_eager
from test_oracle import llama
from test_tova_knorm import assert_same_as_full

import kvpolicy
from kvpolicy import CacheMisuseError, ConfigError, make_cache, make_policy
from kvpolicy.core import registry
from kvpolicy.policies import BUILTIN_POLICIES, KVzipConfig, KVzipPolicy, kvzip_prompt_ids

SCORE_TOL = 1e-5
LENGTHS = [40, 25, 33]  # left-padded: pads 0, 15, 7

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def per_head_sets(cache, layer: int) -> list[list[set[int]]]:
    pos = cache.kept_positions(layer)
    return [[set(pos[b, h][pos[b, h] >= 0].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]


def prefill(model, inputs, cache):
    mask = inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return model(**inputs, position_ids=position_ids, **{kvpolicy.cache_argument(model): cache}, use_cache=True)


# ------------------------------------------------------------------------------- registration and settings


def test_listed_registered_as_a_plugin_and_built_by_name():
    assert "kvzip" in kvpolicy.available_policies()
    assert KVzipPolicy in BUILTIN_POLICIES
    hooked = [cls for classes in registry.plugin_manager().hook.kvpolicy_policies() for cls in classes]
    assert KVzipPolicy in hooked, "registered through the kvpolicy.policies hook"
    cache = make_cache("kvzip", compression_ratio=0.3, chunk_size=64, prompt_ids=[5, 6])
    assert isinstance(cache.policy, KVzipPolicy) and cache.policy.config.prompt_ids == (5, 6)
    assert isinstance(make_policy(KVzipConfig(budget=5)), KVzipPolicy)
    c = KVzipConfig()
    assert (c.compression_ratio, c.sink_size, c.window_size, c.allocation, c.chunk_size, c.overlap) == (
        0.5, 4, 0, "global", 2048, 8)
    assert c.prompt_ids == c.chunk_prompt_ids == c.suffix_ids == ()
    for bad in (dict(compression_ratio=1.0), dict(chunk_size=0), dict(budget=0), dict(overlap=-1), dict(x=1),
                dict(allocation="per_head")):
        with pytest.raises(ConfigError):
            make_cache("kvzip", **bad)


class StubTokenizer:
    """Characters as ids, and a chat template of ``<u>{message}</u><a>``."""

    def __init__(self, template: bool):
        self.chat_template = "x" if template else None

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<u>{messages[0]['content']}</u><a>"

    def encode(self, text, add_special_tokens):
        assert not add_special_tokens
        return [ord(ch) for ch in text]


@pytest.mark.parametrize("template", [True, False])
def test_prompt_ids_are_the_reference_s_instructions_and_the_chat_suffix(template):
    ids = kvzip_prompt_ids(StubTokenizer(template))
    text = {k: "".join(map(chr, v)) for k, v in ids.items()}
    assert text["prompt_ids"] == "\n\nRepeat the previous context exactly."
    assert text["chunk_prompt_ids"] == "\n\nRepeat the part of the previous context exactly, starting with"
    assert text["suffix_ids"] == ("</u><a>" if template else "\n")
    assert make_cache("kvzip", **ids).policy.config.suffix_ids == ids["suffix_ids"]


def test_reconstruction_chunks():
    """Chunk ``c`` of each row: instruction (later chunks: the other instruction and the previous chunk's
    last ``overlap`` tokens), suffix, the row's tokens ``[c * size, (c + 1) * size)``; padded on the right; a
    row with nothing left is all padding."""
    policy = make_policy("kvzip", chunk_size=4, overlap=2, prompt_ids=(90,), chunk_prompt_ids=(91, 92),
                         suffix_ids=(93,), pad_id=7)
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [0, 0, 0, 20, 21, 22]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    first, second = policy.scoring_inputs(ids, mask)
    assert first.input_ids.tolist() == [[90, 93, 10, 11, 12, 13], [90, 93, 20, 21, 22, 7]]
    assert first.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 1, 0]]
    assert first.info["spans"] == [(0, 4, 2), (0, 3, 2)]
    assert second.input_ids.tolist() == [[91, 92, 12, 13, 93, 14, 15], [7] * 7]
    assert second.attention_mask.tolist() == [[1] * 7, [0] * 7]
    assert second.info["spans"] == [(4, 6, 5), (4, 4, 0)]


# ------------------------------------------------------------------------------- the oracle


def oracle_scores(model, ids: list[int], config: KVzipConfig) -> list[torch.Tensor]:
    """Per layer, float64 ``[H_kv, n]`` for one unpadded row of tokens ``ids``: each chunk's input after the
    whole prompt in one eager forward with ``output_attentions``; the reconstruction queries' weights
    renormalised over the sinks, the chunk and the input; the largest over queries and a group's heads."""
    n, cfg = len(ids), model.config
    hkv, groups = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    scores = [torch.zeros(hkv, n, dtype=torch.float64) for _ in range(cfg.num_hidden_layers)]
    for start in range(0, n, config.chunk_size):
        end = min(n, start + config.chunk_size)
        lead = list(config.prompt_ids) if start == 0 else list(config.chunk_prompt_ids) + ids[
            max(0, start - config.overlap) : start]
        line = lead + list(config.suffix_ids) + ids[start:end]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids + line]), output_attentions=True)
        sinks = min(config.sink_size, start)
        keys = list(range(sinks)) + list(range(start, end)) + list(range(n, n + len(line)))
        for layer, probs in enumerate(out.attentions):  # [1, H_q, n + Q, n + Q]
            weights = probs[0, :, n:, keys].double()  # the input's queries over the softmax's keys
            weights = weights / weights.sum(-1, keepdim=True)
            best = weights.amax(dim=1).view(hkv, groups, -1).amax(dim=1)  # [H_kv, keys]
            scores[layer][:, start:end] = best[:, sinks : sinks + end - start]
    return scores


def assert_shared_ranking(cache, model, inputs, lengths, config: KVzipConfig, where: str):
    """Every row keeps its protected tokens in every layer and head, ``keep`` per layer and head in total
    over what shares a ranking (all layers and heads, a layer's heads, or one head: ``allocation``), and no
    evicted token outscores a kept one in that ranking."""
    width = max(lengths)
    layers = model.config.num_hidden_layers
    for row, n in enumerate(lengths):
        ids = inputs["input_ids"][row, width - n :].tolist()
        scores = oracle_scores(model, ids, config)
        keep = min(config.budget, n) if config.budget is not None else n - int(n * config.compression_ratio)
        recent = min(config.window_size, keep)
        must = set(range(min(config.sink_size, keep - recent))) | set(range(n - recent, n))
        heads = model.config.num_key_value_heads
        groups = {"global": [[(layer, h) for layer in range(layers) for h in range(heads)]],
                  "layer": [[(layer, h) for h in range(heads)] for layer in range(layers)],
                  "uniform": [[(layer, h)] for layer in range(layers) for h in range(heads)]}[config.allocation]
        for group in groups:
            kept, evicted, total = [], [], 0
            for layer, head in group:
                got = per_head_sets(cache, layer)[row][head]
                assert must <= got, f"{where}: layer {layer} row {row} head {head} lost {sorted(must - got)}"
                total += len(got)
                kept += [scores[layer][head, p].item() for p in got - must]
                evicted += [scores[layer][head, p].item() for p in set(range(n)) - got]
            assert total == keep * len(group), f"{where}: row {row} layers and heads {group} keep {total}"
            if kept and evicted:
                assert min(kept) >= max(evicted) - SCORE_TOL, f"{where}: row {row} evicted a higher score"


ORACLE_CASES = {
    "defaults": dict(compression_ratio=0.5),
    "layer": dict(compression_ratio=0.6, allocation="layer"),
    "uniform": dict(compression_ratio=0.6, allocation="uniform", chunk_size=20),
    "chunks-instructions": dict(compression_ratio=0.5, chunk_size=12, overlap=3, prompt_ids=(5, 6, 7),
                                chunk_prompt_ids=(8, 9), suffix_ids=(10, 11)),
    "budget-window": dict(budget=14, window_size=3, sink_size=2, chunk_size=16),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_kept_tokens_follow_the_reconstruction_attention_of_the_model(case):
    settings = ORACLE_CASES[case]
    config = KVzipConfig(**settings)
    inputs = batch(LENGTHS)
    cache = make_cache("kvzip", **settings)
    prefill(llama(2, "sdpa"), inputs, cache)
    assert_shared_ranking(cache, llama(2, "eager"), inputs, LENGTHS, config, case)
    counts = [[len(s) for s in row] for layer in range(4) for row in per_head_sets(cache, layer)]
    assert any(len(set(c)) > 1 for c in counts) == (config.allocation != "uniform"), "the heads' counts differ"
    if config.allocation == "global":
        per_layer = [sum(len(s) for s in per_head_sets(cache, layer)[0]) for layer in range(4)]
        assert len(set(per_layer)) > 1, "the layers keep different counts"


# ------------------------------------------------------------------------------- budgets and protections


@settings(max_examples=25)
@example(lengths=LENGTHS, ratio=0.5, sinks=4, window=0, allocation="global", chunk=2048, steps=3)
@example(lengths=[30, 9], ratio=0.7, sinks=2, window=3, allocation="layer", chunk=7, steps=2)
@example(lengths=[30, 9], ratio=0.7, sinks=2, window=3, allocation="uniform", chunk=7, steps=2)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=3), ratio=st.floats(0.0, 0.9),
       sinks=st.integers(0, 5), window=st.integers(0, 6), allocation=st.sampled_from(["global", "layer", "uniform"]),
       chunk=st.integers(3, 60), steps=st.integers(0, 4))
def test_budget_shared_never_exceeded_and_protected_tokens_kept(lengths, ratio, sinks, window, allocation, chunk,
                                                                steps):
    """After the prompt each row keeps ``n - int(n * ratio)`` tokens per layer and head on average (exactly: in
    total over the layers and heads, per layer, or per head, by ``allocation``), with its sinks and window in
    every layer and head; decoding then adds one token per head and step (the prompt only is compressed)."""
    model = tiny_model("llama", "sdpa")
    cache = make_cache("kvzip", compression_ratio=ratio, sink_size=sinks, window_size=window, allocation=allocation,
                       chunk_size=chunk, compiled_decode=False)
    greedy(model, batch(lengths), cache, new_tokens=steps + 1)
    for row, n in enumerate(lengths):
        keep = n - int(n * ratio)
        recent = min(window, keep)
        must = set(range(min(sinks, keep - recent))) | set(range(n - recent, n + steps))
        totals = []
        for layer in range(4):
            sets = per_head_sets(cache, layer)[row]
            assert all(must <= s for s in sets), f"layer {layer} row {row}: a protected token lost"
            assert all(set(range(n, n + steps)) <= s for s in sets), "generated tokens are never evicted"
            totals.append([len(s) - steps for s in sets])
        if allocation == "uniform":
            assert totals == [[keep] * 2] * 4, f"row {row}: {totals}"
        elif allocation == "layer":
            assert [sum(t) for t in totals] == [keep * 2] * 4, f"row {row}: {totals}"
        else:
            assert sum(map(sum, totals)) == keep * 2 * 4, f"row {row}: {totals}"


@pytest.mark.parametrize("settings", [dict(budget=60), dict(compression_ratio=0.0),
                                      dict(budget=50, allocation="layer", chunk_size=9)],
                         ids=["budget", "ratio0", "layer"])
def test_generous_budget_gives_exactly_the_full_policys_tokens(settings):
    """Nothing evicted: the same tokens and kept positions as ``full``; the scoring pass left no slot behind
    and did not change the prompt's logits (the first generated token)."""
    cache, full = assert_same_as_full("kvzip", settings)
    for layer in range(4):
        assert cache.layers[layer].total_seen == full.layers[layer].total_seen


# ------------------------------------------------------------------------------- the routes that fill a cache


def test_context_then_question_row_chunks_and_a_padded_row():
    """``model(context)`` then ``generate`` with the question continues the scored cache; a prefill in row
    chunks keeps what the whole batch keeps; a padded row keeps what it keeps alone (rows are ranked apart)."""
    model = llama(2, "sdpa")
    inputs = batch(LENGTHS)
    whole = make_cache("kvzip", compression_ratio=0.5)
    logits = prefill(model, inputs, whole).logits[:, -1]
    plain = prefill(model, inputs, make_cache("full")).logits[:, -1]
    assert torch.equal(logits, plain), "the prompt's own forward is unchanged"
    chunked = make_cache("kvzip", compression_ratio=0.5)
    kvpolicy.prefill(model, inputs["input_ids"], inputs["attention_mask"], chunked, rows=1)
    alone = make_cache("kvzip", compression_ratio=0.5)
    prefill(model, {k: v[1:2, 40 - 25 :] for k, v in inputs.items()}, alone)
    for layer in range(4):
        # kvpolicy.prefill clamps pad positions to 0 where the others give them 1: pads are never attended
        assert per_head_sets(chunked, layer) == per_head_sets(whole, layer)
        assert per_head_sets(alone, layer)[0] == per_head_sets(whole, layer)[1]
    question = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([inputs["input_ids"], question], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(question)], 1)
    before = [sum(map(len, row)) for row in per_head_sets(whole, 2)]
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, **{kvpolicy.cache_argument(model): whole},
                       max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    after = [sum(map(len, row)) for row in per_head_sets(whole, 2)]
    assert [a - b for a, b in zip(after, before)] == [2 * (5 + 3)] * 3, "the question and answer are all kept"
    with torch.no_grad():  # the joined row chunks decode too (they were scored)
        model.generate(input_ids=ids, attention_mask=mask, **{kvpolicy.cache_argument(model): chunked},
                       max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_routes_that_cannot_score_say_how_to_fix_it():
    model = tiny_model("llama", "sdpa")
    inputs = batch([20])
    cache = make_cache("kvzip", compression_ratio=0.5)
    with torch.no_grad():
        # the outer model's forward still calls its base model, which runs the pass; the base model's forward
        # called directly is what bypasses every model call
        model.model.forward(**inputs, **{kvpolicy.cache_argument(model): cache})
        outer = make_cache("kvzip", compression_ratio=0.5)
        model.forward(**inputs, **{kvpolicy.cache_argument(model): outer})
        assert outer.valid_tokens_per_layer() != [[20]] * 4, "the outer forward's base-model call scored it"
        with pytest.raises(CacheMisuseError, match="scores the prompt with a second forward"):
            model(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 21, dtype=torch.long),
                  **{kvpolicy.cache_argument(model): cache})
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(CacheMisuseError, match="input_ids"):
            model(inputs_embeds=embeds, **{kvpolicy.cache_argument(model): make_cache("kvzip")})


def test_the_pass_runs_once_per_chunk_through_the_base_model():
    """The extra prefill cost: one base-model forward per chunk, of the chunk's input (the prompt's tokens and
    the instruction), whatever the number of layers; the prompt's own forward is one call of the model."""
    model = tiny_model("llama", "sdpa")
    calls: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        prefill(model, batch([40, 25]), make_cache("kvzip", chunk_size=16, prompt_ids=(5, 6), suffix_ids=(7,)))
    finally:
        hook.remove()
    # the prompt (width 40); then chunks of 16, 16, 8 tokens of the longest row, each after its lead:
    # 2 + 1 instruction and suffix ids for the first, 0 + 8 overlap + 1 for the later ones
    assert calls == [40, 3 + 16, 9 + 16, 9 + 8]


# ------------------------------------------------------------------------------- compiled decode path


def test_compiled_generate_equals_the_eager_path(fresh_dynamo, monkeypatch):
    """The pass runs before the layers freeze (once: not after the prompt's forward too); the compiled step
    (forced on the CPU, ``eager`` backend) over heads of different lengths gives the eager path's tokens and
    kept positions, in one graph."""
    freezes = []
    start = kvpolicy.PolicyCache.start_decoding

    def start_decoding(self):
        start(self)
        if self.is_frozen():
            freezes.append(1)

    monkeypatch.setattr(kvpolicy.PolicyCache, "start_decoding", start_decoding)
    model = llama(2, "sdpa")
    cache, eager = compiled_and_eager(model, "kvzip", dict(compression_ratio=0.5, chunk_size=16))
    assert freezes == [1], "frozen once, after the scoring pass"
    for layer in range(4):
        assert per_head_sets(cache, layer) == per_head_sets(eager, layer)


def test_a_4d_mask_scores_as_its_2d_padding_mask():
    """transformers gives a compileable cache's prompt forward a 4-D additive mask (transformers 5.17 on a
    GPU, where the compiled decode is the default): the scoring pass reads each row's padding from the cache,
    and keeps what the 2-D mask keeps (it crashed indexing the prompt's tokens with the 4-D mask)."""
    model = tiny_model("llama", "sdpa")
    x = batch([40, 27], seed=3)
    m2 = x["attention_mask"]
    width = m2.shape[1]
    allowed = torch.ones(width, width, dtype=torch.bool).tril().view(1, 1, width, width) & m2.bool().view(2, 1, 1, -1)
    m4 = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    kept = []
    for mask in (m2, m4):
        cache = make_cache("kvzip", compression_ratio=0.5, compiled_decode=False)
        with torch.no_grad():
            model(input_ids=x["input_ids"], attention_mask=mask, past_key_values=cache)
        kept.append([cache.kept_positions(i) for i in range(len(cache.layers))])
    assert all(int((k >= 0).sum()) < (40 + 27) * k.shape[1] for k in kept[0])  # every layer compressed
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))
