"""PyramidInfer's prune-hidden prefill: deeper layers compute only the tokens the layer below kept."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import COMMON, batch, greedy, tiny_model
from transformers import AutoModelForCausalLM, GemmaConfig, Phi3Config

from kvpolicy import make_cache
from kvpolicy.core.errors import ConfigError, UnsupportedModelError

PRUNE = {"prefill_mode": "prune_hidden"}


def tiny_phi3(layers: int):
    torch.manual_seed(0)
    config = Phi3Config(**COMMON)
    config.num_hidden_layers = layers
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def model_for(family: str, attn: str, layers: int):
    return tiny_phi3(layers) if family == "phi3" else tiny_model(family, attn, layers=layers)


def layer_output_lengths(model):
    """Record the token count each decoder layer outputs, first call only (the prefill)."""
    lengths: dict[int, int] = {}

    def hook(index):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            lengths.setdefault(index, out.shape[1])

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    return lengths, handles


def kept(cache, layer: int, row: int) -> list[int]:
    return [p for p in cache.kept_positions(layer)[row, 0].tolist() if p >= 0]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [[40], [40, 25, 31]])
def test_whole_prompt_budget_generates_what_cache_only_and_full_do(family, attn, lengths):
    """Nothing is dropped, so this checks that the interception itself changes nothing."""
    model = tiny_model(family, attn)
    inputs = batch(lengths)
    full = greedy(model, inputs, make_cache("full"), new_tokens=10)
    only = greedy(model, inputs, make_cache("pyramidinfer", prefill_decay_ratio=1.0), new_tokens=10)
    prune = make_cache("pyramidinfer", prefill_decay_ratio=1.0, **PRUNE)
    assert torch.equal(greedy(model, inputs, prune, new_tokens=10), full)
    assert torch.equal(only, full)
    assert prune.valid_tokens_per_layer()[0] == [n + 9 for n in lengths]


@pytest.mark.parametrize("family, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa"), ("phi3", "sdpa")])
def test_pruned_layer_computes_exactly_the_kept_tokens(family, attn):
    """Layers 0-1 keep the whole prompt (the schedule starts at 1.0), layer 2 prunes, and layer 3
    gets only layer 2's kept tokens with their RoPE and causal order: the prefill logits equal
    running layer 3 by hand on those tokens at their true positions."""
    model = model_for(family, attn, 4)
    n = 90
    inputs = batch([n], seed=5)
    cache = make_cache("pyramidinfer", min_context_length=4, prefill_decay_ratio=0.5, **PRUNE)
    with torch.no_grad():
        logits = model(**inputs, past_key_values=cache).logits[0]
    keep = torch.tensor(kept(cache, 2, 0))
    assert len(keep) < n and keep[-1] == n - 1
    captured = {}

    def capture(module, args, output):
        captured["h"] = output

    handle = model.model.layers[2].register_forward_hook(capture)
    with torch.no_grad():
        model(**inputs)  # no cache: the exact full forward up to layer 2
        handle.remove()
        h = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
        h = h[:, keep]
        pos = keep.view(1, -1)
        cos_sin = model.model.rotary_emb(h, position_ids=pos)
        k = len(keep)
        allowed = torch.ones(k, k, dtype=torch.bool).tril()
        mask = torch.zeros(1, 1, k, k).masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = model.model.layers[3](h, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        expected = model.lm_head(model.model.norm(out))[0]
    assert logits.shape == expected.shape == (k, 97)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family, attn", [("llama", "sdpa"), ("qwen2", "eager"), ("mistral", "sdpa")])
def test_padded_rows_match_rows_alone(family, attn):
    model = tiny_model(family, attn, layers=6)
    lengths = [120, 90, 64]
    inputs = batch(lengths, seed=3)
    together = make_cache("pyramidinfer", min_context_length=4, **PRUNE)
    out_together = greedy(model, inputs, together, new_tokens=12)
    width = max(lengths)
    for row, n in enumerate(lengths):
        alone = make_cache("pyramidinfer", min_context_length=4, **PRUNE)
        out_alone = greedy(model, {k: v[row : row + 1, width - n :] for k, v in inputs.items()}, alone, new_tokens=12)
        assert torch.equal(out_together[row], out_alone[0])
        for layer in range(6):
            assert kept(together, layer, row) == kept(alone, layer, 0)


def test_deeper_layers_compute_fewer_tokens_and_keep_nested_subsets():
    layers, lengths = 8, [300, 200, 257]
    model = tiny_model("llama", "sdpa", layers=layers)
    inputs = batch(lengths, seed=1)
    settings_ = dict(min_context_length=16, prefill_recent_ratio=0.1, prefill_decay_ratio=0.5)
    only = make_cache("pyramidinfer", **settings_)
    prune = make_cache("pyramidinfer", **settings_, **PRUNE)
    computed, handles = layer_output_lengths(model)
    with torch.no_grad():
        logits = model(**inputs, past_key_values=prune).logits
        for handle in handles:
            handle.remove()
        model(**inputs, past_key_values=only)
    counts = prune.valid_tokens_per_layer()
    # the same budgets as cache-only, which follow the compounded schedule
    assert counts == only.valid_tokens_per_layer()
    # worked by hand (recent window w = 1 + int(0.1 n), context C = n - w, cosine ratios r_l with decay 0.5,
    # each layer int(previous * r_l) while above the floor of 16), plus the window; e.g. 200 tokens:
    # w 21, C 179 -> 179, 179, 175, 162, 136 (int(136.9987)), 102, 66, 37; + 21
    expected = {300: [300, 300, 294, 274, 236, 184, 131, 88], 200: [200, 200, 196, 183, 157, 123, 87, 58],
                257: [257, 257, 252, 235, 202, 158, 112, 75]}
    for row, n in enumerate(lengths):
        assert [c[row] for c in counts] == expected[n]
    # layer l + 1 computes exactly the (largest row's) tokens layer l kept; layers 0-1 see the whole prompt
    assert computed[0] == computed[1] == max(lengths)
    for layer in range(1, layers - 1):
        assert computed[layer + 1] == max(counts[layer])
    assert computed[layers - 1] < max(lengths) // 2
    assert logits.shape[1] == computed[layers - 1]  # prefill logits: the last layer's input tokens only
    for row, n in enumerate(lengths):
        w = 1 + int(n * 0.1)
        for layer in range(1, layers):
            now, before = kept(prune, layer, row), kept(prune, layer - 1, row)
            assert set(now) <= set(before)
            assert now[:4] == [0, 1, 2, 3] and now[-w:] == list(range(n - w, n))  # sinks and recent window


@settings(max_examples=8)
@given(
    lengths=st.lists(st.integers(20, 90), min_size=1, max_size=3),
    decay=st.floats(0.2, 1.0),
    min_context=st.integers(0, 30),
    sinks=st.integers(0, 6),
)
def test_property_nested_sets_same_counts_last_token_kept(lengths, decay, min_context, sinks):
    layers = 5
    model = tiny_model("llama", "sdpa", layers=layers)
    inputs = batch(lengths, seed=len(lengths))
    s = dict(prefill_decay_ratio=decay, min_context_length=min_context, streamingllm_sink_len=sinks)
    prune = make_cache("pyramidinfer", **s, **PRUNE)
    only = make_cache("pyramidinfer", **s)
    out = greedy(model, inputs, prune, new_tokens=3)
    greedy(model, inputs, only, new_tokens=3)
    assert out.shape == (len(lengths), 3)
    assert prune.valid_tokens_per_layer() == only.valid_tokens_per_layer()
    for row, n in enumerate(lengths):
        for layer in range(1, layers):
            now = kept(prune, layer, row)
            assert set(now) <= set(kept(prune, layer - 1, row))
            assert all(p in now for p in range(n - 1, n + 2))  # the last prompt token and the generated ones


def test_kv_head_aggregation_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="head_aggregation='layer'"):
        make_cache("pyramidinfer", head_aggregation="kv_head", **PRUNE)


def test_unsupported_family_is_refused_with_the_fix():
    config = GemmaConfig(**{**COMMON, "head_dim": 16})
    config.num_hidden_layers = 2
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(UnsupportedModelError, match="prefill_mode='cache_only'"):
        greedy(model, batch([30]), make_cache("pyramidinfer", **PRUNE), new_tokens=2)


def test_prune_preset_is_pyramidinfer_54_in_prune_mode():
    from kvpolicy import make_policy

    base = make_policy("pyramidinfer_54").config
    assert make_policy("pyramidinfer_54_prune").config == base.model_copy(update=PRUNE)


def test_default_mode_is_cache_only():
    assert make_cache("pyramidinfer").policy.config.prefill_mode == "cache_only"
    assert not make_cache("pyramidinfer").policy.prunes_hidden_states
    assert make_cache("pyramidinfer", **PRUNE).policy.prunes_hidden_states


def test_prune_floor_preset_is_the_floor_preset_cut_from_47_percent():
    from kvpolicy import make_policy

    base = make_policy("pyramidinfer_54_floor").config
    assert make_policy("pyramidinfer_54_floor_prune").config == base.model_copy(
        update={**PRUNE, "prune_hidden_start": 0.47})


@pytest.mark.parametrize("lengths", [[90], [90, 61]])
def test_start_past_the_last_layer_is_cache_only_exactly(lengths):
    """No layer cuts (the first cut would be layer int(1.0 * L) = L): what cache_only generates, bit for bit."""
    model = tiny_model("llama", "sdpa", layers=6)
    inputs = batch(lengths, seed=8)
    s = dict(min_context_length=4, prefill_decay_ratio=0.5)
    only = make_cache("pyramidinfer", **s)
    prune = make_cache("pyramidinfer", **s, **PRUNE, prune_hidden_start=1.0)
    with torch.no_grad():
        assert torch.equal(model(**inputs, past_key_values=prune).logits, model(**inputs, past_key_values=only).logits)
    for layer in range(6):
        assert torch.equal(prune.kept_positions(layer), only.kept_positions(layer))
    assert torch.equal(greedy(model, inputs, make_cache("pyramidinfer", **s, **PRUNE, prune_hidden_start=1.0)),
                       greedy(model, inputs, make_cache("pyramidinfer", **s)))


@pytest.mark.parametrize("start", [0.0, 0.5])
def test_cut_layers_take_sdpa_causal_kernel_where_rows_keep_alike(monkeypatch, start):
    """A cut layer holds exactly its queries' tokens in position order: with every row keeping the same count
    it runs SDPA's causal kernel with no mask (as cache_only's layers do); rows keeping different counts leave
    surplus slots, masked by the cache's own mask."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((q.shape[2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_model("llama", "sdpa", layers=6)
    s = dict(min_context_length=4, prefill_decay_ratio=0.5, prune_hidden_start=start, **PRUNE)
    with torch.no_grad():
        model(**batch([150]), past_key_values=make_cache("pyramidinfer", **s))
    # layers 0 and 1 keep the whole prompt (the schedule starts at 1.0; layer 2 is the first to prune): the layers
    # up to the first that both cuts and prunes, and the one above it, compute it all
    whole = max(int(start * 6), 2) + 1
    assert [q for q, _, _ in calls][:whole] == [150] * whole
    assert all(q < 150 for q, _, _ in calls[whole:]) and len(calls) == 6
    assert all(no_mask and causal for _, no_mask, causal in calls)  # one row: every layer causal, no mask
    calls.clear()
    with torch.no_grad():
        model(**batch([150, 97]), past_key_values=make_cache("pyramidinfer", **s))
    cut = calls[whole:]
    assert cut and all(not no_mask for _, no_mask, _ in cut)  # padded rows keep different counts: masked


def test_a_prompt_continued_in_a_second_forward_runs_it_as_decoding():
    """kvpolicy has no sequence-chunked prefill: the first forward is the prefill (and the only one cut);
    a second forward of several tokens is computed whole by every layer over the kept cache."""
    model = tiny_model("llama", "sdpa", layers=6)
    inputs = batch([120], seed=6)
    cache = make_cache("pyramidinfer", min_context_length=4, prefill_decay_ratio=0.5, **PRUNE)
    more = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(**inputs, past_key_values=cache)
        computed, handles = layer_output_lengths(model)
        out = model(input_ids=more, attention_mask=torch.ones(1, 140, dtype=torch.long), past_key_values=cache)
    for handle in handles:
        handle.remove()
    assert out.logits.shape[1] == 20 and set(computed.values()) == {20}
    assert cache.seen_tokens() == [140]
