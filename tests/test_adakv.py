"""Ada-KV's head-adaptive budgets (``head_budget="adaptive"``) for snapkv, pyramidkv and pyramidinfer's
per-head mode: the split itself against a naive re-implementation on small tensors, the split of SnapKV's
votes from the model's own attention weights, budgets and protections, a generous budget equal to
``full``, decoding over heads of different lengths against test_oracle's independent route, row moves
and row chunks, and the compiled decode path against the eager one.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from models import batch, greedy, tiny_model
from test_compiled_generate import compiled_and_eager
from test_oracle import TOL, Kept, Run, llama, oracle_step
from transformers import DynamicCache

import kvpolicy
from kvpolicy import ConfigError, make_cache
from kvpolicy.core.policy import Plan
from kvpolicy.core.selection import select_slots

LENGTHS = [48, 31, 40]  # test_oracle's: pads 0, 17, 8
SNAP = dict(compression_ratio=0.5, window_size=4, sink_size=2, kernel_size=3, head_budget="adaptive")
PYRAMID = dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4, gen_recent_ratio=0.1,
               exceed_length_to_compress=4, gen_query_window=8, head_aggregation="kv_head", head_budget="adaptive")
CASES = {
    "snapkv": ("snapkv", SNAP),
    "snapkv-floor0": ("snapkv", dict(SNAP, head_floor=0.0)),
    "pyramidkv": ("pyramidkv", dict(SNAP, head_floor=0.5)),
    "pyramidinfer": ("pyramidinfer", PYRAMID),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def per_head_sets(cache, layer: int) -> list[list[set[int]]]:
    pos = cache.kept_positions(layer)
    return [[set(pos[b, h][pos[b, h] >= 0].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]


# ------------------------------------------------------------------------------- settings


def test_settings_and_their_checks():
    for policy in ("snapkv", "pyramidkv"):
        c = make_cache(policy).policy.config
        assert (c.head_budget, c.head_floor, c.head_adaptive) == ("uniform", 0.2, None)
        c = make_cache(policy, head_budget="adaptive", head_floor=0.3).policy.config
        assert c.head_adaptive == 0.3
    c = make_cache("pyramidinfer", head_aggregation="kv_head", head_budget="adaptive").policy.config
    assert c.head_adaptive == 0.2
    with pytest.raises(ConfigError, match="head_aggregation='kv_head'"):
        make_cache("pyramidinfer", head_budget="adaptive")
    with pytest.raises(ConfigError, match="compress='prefill'"):
        make_cache("snapkv", head_budget="adaptive", compress="both")
    for bad in (dict(head_budget="per_head"), dict(head_floor=1.5), dict(head_floor=-0.1)):
        with pytest.raises(ConfigError):
            make_cache("snapkv", **bad)


# ------------------------------------------------------------------------------- the split (pure)


def naive_split(scores, local, seen, keep, sinks, recent, alpha):
    """Per row and head, the kept row-local positions, by Ada-KV's rule written out with Python sets:
    protected tokens, then each head's floor of its best, then the best of everything else of the row."""
    b, h, _ = scores.shape
    out = []
    for row in range(b):
        valid = [[j for j in range(local.shape[2]) if local[row, hd, j] >= 0] for hd in range(h)]
        r = min(keep, recent)
        s = min(keep - r, sinks)
        forced, score_of = [], {}
        for hd in range(h):
            prot = {j for j in valid[hd] if local[row, hd, j] < s or local[row, hd, j] >= seen[row] - r}
            own = min(keep, len(valid[hd]))
            floor = (max(1, int(own * alpha)) if own > 0 else 0) if alpha > 0 else 0
            rest = sorted(set(valid[hd]) - prot, key=lambda j, hd=hd: -scores[row, hd, j].item())
            forced.append(prot | set(rest[: max(0, floor - len(prot))]))
            for j in valid[hd]:
                score_of[hd, j] = scores[row, hd, j].item()
        total = min(h * keep, sum(len(v) for v in valid))
        free = sorted(((hd, j) for (hd, j) in score_of if j not in forced[hd]), key=lambda x: -score_of[x])
        extra = free[: total - sum(len(f) for f in forced)]
        chosen = [set(f) for f in forced]
        for hd, j in extra:
            chosen[hd].add(j)
        out.append([{int(local[row, hd, j]) for j in chosen[hd]} for hd in range(h)])
    return out


@settings(max_examples=80)
@example(rows=[(30, [30, 30])], keep=10, sinks=2, recent=3, alpha=0.2, seed=0)
@example(rows=[(30, [30, 22, 14]), (12, [12, 9, 12])], keep=8, sinks=0, recent=0, alpha=0.0, seed=1)
@example(rows=[(20, [20, 20])], keep=3, sinks=4, recent=4, alpha=1.0, seed=2)
@given(
    rows=st.lists(st.integers(1, 30).flatmap(lambda n: st.tuples(
        st.just(n), st.lists(st.integers(1, n), min_size=1, max_size=3))), min_size=1, max_size=3).filter(
        lambda rs: len({len(r[1]) for r in rs}) == 1),
    keep=st.integers(1, 30),
    sinks=st.integers(0, 4),
    recent=st.integers(0, 6),
    alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_adaptive_split_equals_the_naive_rule(rows, keep, sinks, recent, alpha, seed):
    """Rows of ``n`` real tokens whose heads hold ``counts`` of them (the newest ``min(count, ...)``
    always among them, as after earlier compressions), left-padded into a buffer with empty slots;
    distinct random scores. Per head: at most what it holds; per row: ``keep`` times the heads in total
    (or everything it holds); protections and floors kept; the naive rule's tokens exactly."""
    gen = torch.Generator().manual_seed(seed)
    heads = len(rows[0][1])
    width = max(n for n, _ in rows)
    slots = max(max(c) for _, c in rows) + 2  # a few empty slots in every head
    local = torch.full((len(rows), heads, slots), -1, dtype=torch.long)
    for b, (n, counts) in enumerate(rows):
        for h, count in enumerate(counts):
            others = torch.randperm(n - 1, generator=gen)[: count - 1].sort().values if count > 1 else torch.empty(0)
            kept = torch.cat([others.long(), torch.tensor([n - 1])])  # the newest token is in every head
            local[b, h, : len(kept)] = kept
    pad = torch.tensor([width - n for n, _ in rows]).view(-1, 1, 1)
    pos = torch.where(local >= 0, local + pad, torch.full_like(local, -1))
    scores = torch.rand(local.shape, generator=gen)
    seen = [n for n, _ in rows]
    head_valid = [list(c) for _, c in rows]
    plan = Plan(keep=[keep] * len(rows), scores=scores, sinks=sinks, recent=recent, head_adaptive=alpha)
    got = select_slots(plan, [max(c) for c in head_valid], local, pos, seen, head_valid=head_valid)
    expected = naive_split(scores, local, seen, keep, sinks, recent, alpha)
    if all(min(keep * heads, sum(c)) >= sum(c) for c in head_valid):
        assert got is None, "nothing to evict, yet a selection"
        return
    index, counts = got
    for b in range(len(rows)):
        kept = [set(local[b, h].gather(0, index[b, h, : counts[b][h]]).tolist()) for h in range(heads)]
        assert kept == expected[b], f"row {b}: {kept} != {expected[b]}"
        assert sum(counts[b]) == min(keep * heads, sum(head_valid[b]))
        order = [local[b, h].gather(0, index[b, h, : counts[b][h]]).tolist() for h in range(heads)]
        assert all(o == sorted(o) for o in order), "each head's kept slots come in position order"


def test_uniform_per_head_counts_keep_each_head_s_own_best():
    """A plan with a count per head and no adaptive split: every head keeps exactly its count, its best."""
    local = torch.arange(12).view(1, 1, -1).expand(1, 3, 12).clone()
    scores = torch.rand(1, 3, 12, generator=torch.Generator().manual_seed(0))
    plan = Plan(keep=[[3, 7, 12]], scores=scores)
    index, counts = select_slots(plan, [12], local, local.clone(), [12])
    assert counts == [[3, 7, 12]]
    for h, k in enumerate([3, 7, 12]):
        assert set(index[0, h, :k].tolist()) == set(scores[0, h].topk(k).indices.tolist())


# ------------------------------------------------------------------------------- against the model's attention

SCORE_TOL = 1e-5  # the two routes sum the same float32 probabilities in other orders


def assert_adaptive_split(kept: list[set[int]], scores: list[dict[int, float]], keep: int, must: set[int],
                          alpha: float, where: str):
    """Ada-KV's rule with ties allowed (max-pooled votes tie often): the row keeps ``keep`` per head in
    total; every head its protected tokens and its floor of best ones; beyond those, no evicted token of
    any head scores above a kept one (within SCORE_TOL)."""
    held = [set(sc) for sc in scores]
    assert sum(len(k) for k in kept) == min(len(kept) * keep, sum(len(h) for h in held)), f"{where}: row total"
    free, evicted = [], []
    for h, (k, sc) in enumerate(zip(kept, scores)):
        assert must & held[h] <= k, f"{where} head {h}: lost protected {sorted((must & held[h]) - k)}"
        own = min(keep, len(held[h]))
        floor = (max(1, int(own * alpha)) if own else 0) if alpha > 0 else 0
        others = sorted((sc[p] for p in k - must), reverse=True)
        extra = max(0, floor - len(must & held[h]))
        out = [sc[p] for p in held[h] - k]
        assert len(k) >= floor, f"{where} head {h}: below its floor"
        if extra and out:
            assert others[extra - 1] >= max(out) - SCORE_TOL, f"{where} head {h}: its floor is not its best"
        free += others[extra:]
        evicted += out
    if free and evicted:
        assert min(free) >= max(evicted) - SCORE_TOL, f"{where}: evicted a token scoring above a kept one"


@pytest.mark.parametrize("floor", [0.0, 0.2, 1.0])
def test_snapkv_adaptive_splits_the_votes_of_the_model_s_own_attention(floor):
    """SnapKV's votes from the model's eager attention weights (test_oracle's prefill oracle), split across
    the heads by Ada-KV's rule. ``floor=1.0`` is the uniform selection (every head keeps its own budget)."""
    model = llama(2, "eager")
    settings = dict(SNAP, head_floor=floor)
    run = Run(model, ("snapkv", settings, False), lengths=LENGTHS)
    position_ids = (run.mask.cumsum(-1) - 1).masked_fill(run.mask == 0, 1)
    with torch.no_grad():
        out = model(input_ids=run.ids, attention_mask=run.mask, position_ids=position_ids,
                    **{run.arg: DynamicCache()}, output_attentions=True)
    width, groups, w, k = run.ids.shape[1], 2, settings["window_size"], settings["kernel_size"]
    split_somewhere = False
    for idx, probs in enumerate(out.attentions):  # [B, H_q, Q, K]
        real = torch.arange(width).view(1, -1) >= torch.tensor(run.pad).view(-1, 1)
        votes = (probs * real.view(-1, 1, width, 1))[:, :, -w:].sum(2).view(len(LENGTHS), 2, groups, width).mean(2)
        votes = torch.nn.functional.max_pool1d(votes, k, stride=1, padding=k // 2)
        kept = per_head_sets(run.cache, idx)
        for b, n in enumerate(LENGTHS):
            keep = n - int(n * settings["compression_ratio"])
            recent = min(w, keep)
            must = set(range(min(settings["sink_size"], keep - recent))) | set(range(n - recent, n))
            by_pos = [{p: votes[b, h, run.pad[b] + p].item() for p in range(n)} for h in range(2)]
            assert_adaptive_split(kept[b], by_pos, keep, must, floor, f"layer {idx} row {b}")
            split_somewhere |= len(kept[b][0]) != len(kept[b][1])
    assert split_somewhere == (floor < 1.0), "the heads' budgets must differ somewhere (and only when adaptive)"


# ------------------------------------------------------------------------------- budgets and protections


@settings(max_examples=30)
@example(case="snapkv", lengths=LENGTHS, ratio=0.5, steps=4)
@example(case="pyramidinfer", lengths=LENGTHS, ratio=0.5, steps=9)
@given(case=st.sampled_from(sorted(CASES)), lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3),
       ratio=st.floats(0.0, 0.9), steps=st.integers(0, 9))
def test_row_budget_never_exceeded_floors_and_protections_kept(case, lengths, ratio, steps):
    """After the prompt each row's heads hold together at most the uniform policy's tokens (the budget is
    moved between heads, never grown), each head at least its floor; sinks and the recent window are in
    every head; decoding adds one token per head per step (pyramidinfer's groups then evict the same
    number from every head)."""
    policy, settings = CASES[case]
    settings = dict(settings, compression_ratio=ratio) if policy != "pyramidinfer" else settings
    model = llama(2, "sdpa")
    uniform = make_cache(policy, **dict(settings, head_budget="uniform"), compiled_decode=False)
    cache = make_cache(policy, **settings, compiled_decode=False)
    inputs = batch(lengths)
    greedy(model, inputs, uniform, new_tokens=steps + 1)
    greedy(model, inputs, cache, new_tokens=steps + 1)
    floor = cache.policy.config.head_floor
    for layer in range(4):
        got, ref = per_head_sets(cache, layer), per_head_sets(uniform, layer)
        for b, n in enumerate(lengths):
            seen = n + steps
            budget = len(ref[b][0])  # the uniform policy's per-head count (prompt budget and decode growth)
            assert sum(len(s) for s in got[b]) == sum(len(s) for s in ref[b]), f"layer {layer} row {b}"
            for kept in got[b]:
                assert seen - 1 in kept, "the newest token is in every head"
            if policy != "pyramidinfer":  # prompt-only: each head's count is its prompt count plus the steps
                keep = budget - steps  # the prompt's per-head budget
                assert all(len(kept) - steps >= int(floor * keep) for kept in got[b]), f"layer {layer} row {b}"
                recent = min(settings["window_size"], keep)
                must = set(range(min(settings["sink_size"], keep - recent))) | set(range(n - recent, seen))
                assert all(must <= kept for kept in got[b]), f"layer {layer} row {b}: a protected token lost"


@pytest.mark.parametrize("case", sorted(CASES))
def test_generous_budget_gives_exactly_the_full_policys_tokens(case):
    policy, settings = CASES[case]
    if policy == "pyramidinfer":  # no context pruned at prefill, every decode group kept whole
        settings = dict(settings, min_context_length=10_000, gen_decay_ratio=1.0, gen_compress_ratio=1.0)
    else:
        settings = dict(settings, budget=60)
    model = tiny_model("llama", "sdpa")
    inputs = batch([40, 25, 31])
    full = make_cache("full")
    expected = greedy(model, inputs, full, new_tokens=10)
    cache = make_cache(policy, **settings)
    assert torch.equal(greedy(model, inputs, cache, new_tokens=10), expected)
    assert cache.valid_tokens_per_layer() == full.valid_tokens_per_layer()
    for layer in range(4):
        assert torch.equal(cache.kept_positions(layer), full.kept_positions(layer))


# ------------------------------------------------------------------------------- decoding over unequal heads


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_decoding_over_unequal_heads_matches_the_oracle(case, attn):
    """test_oracle's independent route (a plain DynamicCache holding exactly each head's kept tokens, from
    the keys the model handed the cache, under a mask built here) gives the same next-token logits at
    every step; the heads really hold different numbers of tokens."""
    policy, settings = CASES[case]
    model = llama(2, attn)
    run = Run(model, (policy, settings, True), lengths=LENGTHS)
    token = run.next_token
    unequal = False
    for step in range(6):
        pad = torch.tensor(run.pad).view(-1, 1, 1)
        kept = []
        for idx, layer in enumerate(run.cache.layers):
            hist_k = torch.cat([k for k, _ in run.history[idx]], dim=2)
            hist_v = torch.cat([v for _, v in run.history[idx]], dim=2)
            pos = layer.pos_view().clone()
            valid = pos >= pad
            local = torch.where(valid, pos - pad, torch.full_like(pos, -1))
            index = pos.clamp(min=0).unsqueeze(-1).expand(*pos.shape, hist_k.shape[-1])
            zero = torch.zeros((), dtype=hist_k.dtype)
            kept.append(Kept(torch.where(valid.unsqueeze(-1), hist_k.gather(2, index), zero),
                             torch.where(valid.unsqueeze(-1), hist_v.gather(2, index), zero), local))
            counts = valid.sum(-1)
            unequal |= bool((counts != counts[:, :1]).any())
            assert torch.equal(layer.keys_view()[valid], kept[-1].keys[valid]), "kept keys are their positions'"
        out, _, _ = oracle_step(model, kept, token, list(run.seen))
        got = run.step(token)
        err = (got - out.logits[:, -1]).abs().max().item()
        assert err <= TOL, f"step {step}: logits differ from the oracle's by {err:.3g}"
        token = got.argmax(-1)
    assert unequal, "the heads never held different numbers of tokens"


def test_row_moves_and_row_chunks_keep_each_head_s_count():
    """Beam-style row moves (reorder, select) recount each head's tokens; a prefill in row chunks
    (``kvpolicy.prefill(rows=1)``) joins chunks whose heads differ; both decode like the one-shot cache."""
    model = llama(2, "sdpa")
    inputs = batch(LENGTHS)
    settings = dict(SNAP, kernel_size=1)  # no pooling: no exact ties for a batch and a row to break apart
    whole = make_cache("snapkv", **settings, compiled_decode=False)
    chunked = make_cache("snapkv", **settings, compiled_decode=False)
    kvpolicy.prefill(model, inputs["input_ids"], inputs["attention_mask"], whole)
    kvpolicy.prefill(model, inputs["input_ids"], inputs["attention_mask"], chunked, rows=1)
    for layer in range(4):
        assert per_head_sets(chunked, layer) == per_head_sets(whole, layer)
        assert chunked.layers[layer].valid_counts_per_head() == whole.layers[layer].valid_counts_per_head()
    before = whole.layers[1].valid_counts_per_head()
    assert before is not None and any(len(set(row)) > 1 for row in before)
    whole.reorder_cache(torch.tensor([2, 0, 1]))
    assert whole.layers[1].valid_counts_per_head() == [before[2], before[0], before[1]]
    whole.batch_select_indices(torch.tensor([1]))
    assert whole.layers[1].valid_counts_per_head() == [before[0]]
    assert whole.valid_tokens_per_layer()[1] == [max(before[0])]


# ------------------------------------------------------------------------------- compiled decode path


@pytest.mark.parametrize("case", ["snapkv", "pyramidinfer"])
def test_compiled_generate_equals_the_eager_path(case, fresh_dynamo):
    """Frozen layers whose heads hold different counts (masked surplus slots): the compiled step (forced on
    the CPU, ``eager`` backend) gives the eager path's tokens and kept positions, in one graph; PyramidInfer
    evicts decode groups per head between steps."""
    policy, settings = CASES[case]
    model = llama(2, "sdpa")
    cache, eager = compiled_and_eager(model, policy, settings)
    for layer in range(4):
        assert per_head_sets(cache, layer) == per_head_sets(eager, layer)
    assert any(len({len(s) for s in row}) > 1 for layer in range(4) for row in per_head_sets(cache, layer))
