"""Prune-hidden prefill against a hand-written oracle: a loop over the decoder layers that runs each layer
on the tokens it holds at their explicit positions, computes PyramidInfer's votes and selection itself,
and cuts the hidden states by hand. Nothing of kvpolicy is used to build the expectation: the schedule,
the votes, the protections, the top-k and the cut are written out here.

Checked: every layer's kept positions, its kept keys and values, the cache's memory, and the prefill
logits (the last layer's input tokens), for ``prune_hidden_start`` 0 (every layer cuts, the reference)
and 0.5 (the lower half computes the whole prompt), with and without pooled votes, on unpadded rows and
on a left-padded batch (each row against the oracle run alone)."""

import pytest
import torch
from models import batch, tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpolicy import make_cache

LAYERS = 6
SETTINGS = dict(prefill_mode="prune_hidden", prefill_decay_strategy="constant", prefill_decay_ratio=0.7,
                min_context_length=8, prefill_recent_ratio=0.1, streamingllm_sink_len=4, distance_weight=1.2)


def budgets(n: int, layers: int, ratio: float, floor: int, recent_ratio: float) -> tuple[list[int], int]:
    """Tokens each layer keeps (a constant ratio compounded over the context while above the floor, plus the
    recent window), and the window."""
    w = 1 + int(n * recent_ratio)
    context, out = n - w, []
    for _ in range(layers):
        out.append(context + w)
        candidate = int(context * ratio)
        if context > floor and candidate > floor:
            context = candidate
    return out, w


def pooled(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each slot's score: the largest within ``kernel // 2`` held slots either side."""
    half = kernel // 2
    return torch.stack([scores[max(0, j - half) : j + half + 1].max() for j in range(len(scores))])


@torch.no_grad()
def oracle(model, ids: torch.Tensor, start: float, pool: int = 1, ties: list[list[int]] | None = None):
    """One unpadded row ``ids`` ``[1, n]``: (kept positions per layer, kept keys and values per layer, logits of
    the last layer's input tokens).

    Pooled votes tie (neighbours share a maximum), and which of equal votes a top-k takes is arbitrary. With
    ``ties`` (the kept positions under test, per layer) the oracle checks that they are *a* right choice:
    the protected tokens and, of the rest, votes no lower than any vote left out; then goes on with them."""
    m, n = model.model, ids.shape[1]
    keep, w = budgets(n, LAYERS, SETTINGS["prefill_decay_ratio"], SETTINGS["min_context_length"],
                      SETTINGS["prefill_recent_ratio"])
    sinks, newest = SETTINGS["streamingllm_sink_len"], SETTINGS["distance_weight"]
    first_cut = int(start * LAYERS)
    h = m.embed_tokens(ids)
    held = torch.arange(n)  # the positions the hidden states hold, ascending
    kept_pos, kept_kv = [], []
    for idx, layer in enumerate(m.layers):
        t = len(held)
        position_ids = held.view(1, t)
        cos, sin = m.rotary_emb(h, position_ids=position_ids)
        causal = held.view(1, t) <= held.view(t, 1)  # [query, key]: by position, not by slot
        mask = torch.zeros(1, 1, t, t).masked_fill(~causal, torch.finfo(torch.float32).min)
        # the layer's queries, keys and values, as its attention computes them
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        d = attn.head_dim
        q = attn.q_proj(x).view(1, t, -1, d)
        k = attn.k_proj(x).view(1, t, -1, d)
        v = attn.v_proj(x).view(1, t, -1, d).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids)
        out = out[0] if isinstance(out, tuple) else out
        # votes: the last w queries (the prompt's last w tokens), weighted 1 .. newest
        groups = q.shape[1] // k.shape[1]
        keys = k.repeat_interleave(groups, dim=1)
        logits = (q[:, :, -w:] * attn.scaling) @ keys.transpose(-1, -2)  # [1, Hq, w, t]
        logits = logits.masked_fill(~causal[-w:], float("-inf"))
        probs = logits.softmax(-1)
        weight = torch.linspace(1.0, newest, w).view(1, 1, w, 1)
        per_head = (probs * weight).sum(2)[0].view(k.shape[1], groups, t).mean(1)  # [KV heads, t]: groups averaged
        votes = torch.stack([pooled(row, pool) for row in per_head]).mean(0)  # pooled per KV head, then averaged
        # selection: sinks and the recent window, then the best votes; in position order
        protected = (held < sinks) | (held >= n - w)
        if keep[idx] < t:
            free = keep[idx] - int(protected.sum())
            rest = votes.masked_fill(protected, float("-inf")).topk(free).indices
            chosen = torch.cat([protected.nonzero()[:, 0], rest]).sort().values
            if ties is not None:
                given = torch.tensor([held.tolist().index(p) for p in ties[idx]])
                taken = torch.zeros(t, dtype=torch.bool)
                taken[given] = True
                assert len(given) == keep[idx] and bool(taken[protected].all())
                assert votes[taken & ~protected].min() >= votes[~taken & ~protected].max()
                chosen = given
        else:
            chosen = torch.arange(t)
        kept_pos.append(held[chosen].tolist())
        kept_kv.append((k[:, :, chosen], v[:, :, chosen]))
        h = out
        if first_cut <= idx < LAYERS - 1:  # the next layer computes only this layer's kept tokens
            h, held = h[:, chosen], held[chosen]
    return kept_pos, kept_kv, model.lm_head(m.norm(h))


def prefill(model, inputs, **settings):
    cache = make_cache("pyramidinfer", **{**SETTINGS, **settings})
    with torch.no_grad():
        logits = model(**inputs, past_key_values=cache).logits
    return cache, logits


def layer_kept(cache, layer: int, row: int) -> list[int]:
    return [p for p in cache.kept_positions(layer)[row, 0].tolist() if p >= 0]


@pytest.mark.parametrize("family, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa")])
@pytest.mark.parametrize("start", [0.0, 0.5])
@pytest.mark.parametrize("pool", [1, 3])
def test_one_row_matches_the_oracle(family, attn, start, pool):
    model = tiny_model(family, attn, layers=LAYERS)
    n = 150
    inputs = batch([n], seed=11)
    cache, logits = prefill(model, inputs, prune_hidden_start=start, pool_kernel=pool)
    got = [layer_kept(cache, layer, 0) for layer in range(LAYERS)]
    kept, kv, expected = oracle(model, inputs["input_ids"], start, pool, ties=got if pool > 1 else None)
    assert got == kept
    assert len(kept[-1]) < n // 2
    for layer, (k, v) in enumerate(kv):
        length = len(kept[layer])
        torch.testing.assert_close(cache.layers[layer].keys_view()[:, :, :length], k, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.layers[layer].values_view()[:, :, :length], v, atol=1e-5, rtol=1e-4)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * 4  # keys and values, float32
    assert cache.memory_bytes(allocated=False) == sum(map(len, kept)) * per_token
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("start", [0.0, 0.5])
def test_padded_batch_rows_match_the_oracle_alone(start):
    model = tiny_model("llama", "sdpa", layers=LAYERS)
    lengths = [150, 97, 123]
    inputs = batch(lengths, seed=4)
    cache, logits = prefill(model, inputs, prune_hidden_start=start)
    width = max(lengths)
    for row, n in enumerate(lengths):
        kept, _, expected = oracle(model, inputs["input_ids"][row : row + 1, width - n :], start)
        assert [layer_kept(cache, layer, row) for layer in range(LAYERS)] == kept  # row-local positions
        # the batch's last-layer input is right-aligned: the row's kept tokens are its last slots
        torch.testing.assert_close(logits[row, -expected.shape[1] :], expected[0], atol=1e-5, rtol=1e-4)


def test_layers_below_the_start_keep_what_cache_only_keeps():
    """Below the first cutting layer every layer computes the whole prompt: its cache is cache-only's."""
    model = tiny_model("llama", "sdpa", layers=LAYERS)
    inputs = batch([150, 120], seed=2)
    pruned, _ = prefill(model, inputs, prune_hidden_start=0.5)
    only, _ = prefill(model, inputs, prefill_mode="cache_only")
    for layer in range(int(0.5 * LAYERS) + 1):  # layers 0..3: layer 3 is the first cut, computed on everything
        for row in range(2):
            assert layer_kept(pruned, layer, row) == layer_kept(only, layer, row)
    assert pruned.valid_tokens_per_layer() == only.valid_tokens_per_layer()
