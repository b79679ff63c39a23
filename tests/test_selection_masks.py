"""The two pure functions between a policy and the attention, without a model: ``masks.allowed``
(which kept slots a query may attend to) and ``selection.select_slots`` (which slots a layer
keeps). Each is checked against an oracle written as plain Python loops over lists, on random
inputs (hypothesis), and on one small example worked out by hand."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.core.masks import allowed
from kvpolicy.core.policy import Plan
from kvpolicy.core.selection import select_slots

# ----------------------------------------------------------------------------- masks.allowed


def allowed_oracle(pos, pad, qpos, window):
    """Nested lists ``[B][H][Q][L]``: ``pos`` ``[B][H][L]``, ``pad`` ``[B]``, ``qpos`` ``[B or 1][Q]``."""
    out = []
    for b, heads in enumerate(pos):
        queries = qpos[b] if len(qpos) > 1 else qpos[0]
        out.append([])
        for slots in heads:
            rows = []
            for q in queries:
                row = []
                for p in slots:
                    ok = p >= pad[b] and p <= q  # a real token (-1 < every pad), not after the query
                    if window is not None:
                        ok = ok and p > q - window
                    row.append(ok)
                rows.append(row)
            out[-1].append(rows)
    return out


@st.composite
def mask_inputs(draw):
    b, h, length = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 12))
    q = draw(st.integers(1, 3))
    pos = [[draw(st.lists(st.integers(-1, 20), min_size=length, max_size=length)) for _ in range(h)] for _ in range(b)]
    pad = draw(st.lists(st.integers(0, 5), min_size=b, max_size=b))
    per_row = draw(st.booleans())
    qpos = [draw(st.lists(st.integers(0, 25), min_size=q, max_size=q)) for _ in range(b if per_row else 1)]
    window = draw(st.one_of(st.none(), st.integers(1, 8)))
    return pos, pad, qpos, window


@settings(max_examples=60, deadline=None)
@given(mask_inputs())
def test_allowed_matches_a_loop_oracle(inputs):
    """Every (row, head, query, slot): attended iff the slot holds a real token of the row (not
    empty, not a pad), not after the query, and (sliding layer) less than ``window`` before it; the
    query positions shared by all rows (``[1, 1, Q, 1]``) or per row (``[B, 1, Q, 1]``)."""
    pos, pad, qpos, window = inputs
    b, h, length, q = len(pos), len(pos[0]), len(pos[0][0]), len(qpos[0])
    qpos_t = torch.tensor(qpos, dtype=torch.long).view(len(qpos), 1, q, 1)
    got = allowed(torch.tensor(pos, dtype=torch.long), torch.tensor(pad, dtype=torch.long), qpos_t, window)
    assert got.dtype == torch.bool
    assert got.shape == (b, h, q, length)
    assert got.tolist() == allowed_oracle(pos, pad, qpos, window)


def test_allowed_on_an_example_worked_out_by_hand():
    """One row padded by one token (position 0 is the pad), slots holding positions 0, 1, 3, an
    empty slot and 4 (2 was evicted), queries at positions 3 and 4."""
    pos = torch.tensor([[[0, 1, 3, -1, 4]]])
    pad = torch.tensor([1])
    qpos = torch.tensor([3, 4]).view(1, 1, 2, 1)
    F, T = False, True
    # slot:             pos 0 (pad)  1  3  empty  4
    full = [[[[F, T, T, F, F],   # query at 3: 1 and 3; 4 is in the future
              [F, T, T, F, T]]]]  # query at 4: 1, 3 and 4
    assert allowed(pos, pad, qpos).tolist() == full
    # window 2: a query at q sees positions q - 1 and q only
    windowed = [[[[F, F, T, F, F],   # query at 3: 3 (2 is evicted)
                  [F, F, T, F, T]]]]  # query at 4: 3 and 4
    assert allowed(pos, pad, qpos, window=2).tolist() == windowed


# ----------------------------------------------------------------------------- selection.select_slots


def as_list(value, rows):
    return list(value) if isinstance(value, list) else [value] * rows


def clipped_keep(plan, valid_counts):
    return [max(0, min(k, n)) for k, n in zip(plan.keep, valid_counts)]


def check_selection(result, plan, valid_counts, local, pos, seen, shared_positions=False):
    """Check ``select_slots``' answer against loops over lists; returns the chosen slot sets
    ``[B][H_out]`` (None when nothing is evicted)."""
    keep = clipped_keep(plan, valid_counts)
    if all(k >= n for k, n in zip(keep, valid_counts)):
        assert result is None
        return None
    assert result is not None
    index, got_keep = result
    assert list(got_keep) == keep
    b_size, h_size, length = local.shape
    per_layer_scores = plan.scores is None or plan.scores.shape[1] == 1
    h_out = 1 if shared_positions and per_layer_scores else h_size
    assert index.dtype == torch.long
    assert tuple(index.shape) == (b_size, h_out, max(keep))
    idx, loc_all, pos_all = index.tolist(), local.tolist(), pos.tolist()
    scores = None if plan.scores is None else plan.scores.float().tolist()
    sinks_plan, recent_plan = as_list(plan.sinks, b_size), as_list(plan.recent, b_size)
    chosen_sets = []
    for b in range(b_size):
        k = keep[b]
        recent = min(k, recent_plan[b])
        sinks = min(k - recent, sinks_plan[b])
        chosen_sets.append([])
        for h in range(h_out):
            loc, p = loc_all[b][h], pos_all[b][h]
            if scores is None:
                sc = [float(x) for x in loc]  # recency: the newest first
            else:
                sc = scores[b][0 if len(scores[b]) == 1 else h]
            assert all(0 <= i < length for i in idx[b][h]), "every index (surplus too) is a slot"
            chosen = idx[b][h][:k]  # entries past k: surplus of a row keeping fewer than K
            valid = [s for s in range(length) if loc[s] >= 0]
            protected = {s for s in valid if loc[s] < sinks or loc[s] >= seen[b] - recent}
            # (a) k distinct valid slots
            assert len(set(chosen)) == k, (b, h, chosen)
            assert all(loc[s] >= 0 for s in chosen), (b, h, chosen)
            # (b) sinks and the recent window always fit in the budget: all kept
            assert protected <= set(chosen), (b, h, sorted(protected), chosen)
            # (c) the rest: the best scores (either side of a tie)
            picked = [sc[s] for s in chosen if s not in protected]
            left = [sc[s] for s in valid if s not in set(chosen)]
            if picked and left:
                assert min(picked) >= max(left), (b, h, picked, left)
            # (d) sorted by position
            kept_pos = [p[s] for s in chosen]
            assert all(x < y for x, y in zip(kept_pos, kept_pos[1:])), (b, h, kept_pos)
            chosen_sets[-1].append(set(chosen))
    return chosen_sets


@st.composite
def layer_inputs(draw, shared=False, evict=True, score_heads=None):
    """A layer as a cache holds it: per row and head, distinct row-local positions (below ``seen``)
    in random slots, the same number of them in every head (all heads the same ones when
    ``shared``), the rest invalid (-1); ``pos`` is ``local + pad``. ``evict``: at least one row keeps
    fewer than it holds (else none does). ``score_heads``: "head", "layer", "none", or drawn."""
    b_size, h_size, length = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 12))
    evicting = draw(st.integers(0, b_size - 1)) if evict else -1
    local = [[[-1] * length for _ in range(h_size)] for _ in range(b_size)]
    pos = [[[-1] * length for _ in range(h_size)] for _ in range(b_size)]
    counts, seen, keep, pads = [], [], [], []
    for b in range(b_size):
        n = draw(st.integers(1 if b == evicting else 0, length))
        span = n + draw(st.integers(0, 4))  # positions drawn below span: some tokens already evicted
        pad = draw(st.integers(0, 5))
        top = -1
        for h in range(h_size):
            if h == 0 or not shared:
                positions = draw(st.permutations(range(span)))[:n]
                slots = draw(st.permutations(range(length)))[:n]
            for slot, p in zip(slots, positions):
                local[b][h][slot] = p
                pos[b][h][slot] = p + pad
                top = max(top, p)
        counts.append(n)
        seen.append(top + 1 + draw(st.integers(0, 2)))
        pads.append(pad)
        if b == evicting:
            keep.append(draw(st.integers(-1, n - 1)))
        elif evict:
            keep.append(draw(st.integers(-1, n + 2)))
        else:
            keep.append(draw(st.integers(n, n + 3)))
    kind = score_heads or draw(st.sampled_from(["head", "layer", "none"]))
    if kind == "none":
        scores = None
    else:
        s_heads = h_size if kind == "head" else 1
        total = b_size * s_heads * length
        if draw(st.sampled_from([False, False, False, True])):  # ties now and then
            values = draw(st.lists(st.integers(0, 3), min_size=total, max_size=total))
        else:
            values = draw(st.permutations(range(total)))
        scores = torch.tensor(values, dtype=torch.float32).view(b_size, s_heads, length)
    row_ints = st.one_of(st.integers(0, 5), st.lists(st.integers(0, 5), min_size=b_size, max_size=b_size))
    plan = Plan(keep=keep, scores=scores, sinks=draw(row_ints), recent=draw(row_ints))
    local_t, pos_t = torch.tensor(local, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
    valid_counts = (local_t[:, 0] >= 0).sum(-1).tolist()
    assert valid_counts == counts
    return plan, valid_counts, local_t, pos_t, seen


@settings(max_examples=60, deadline=None)
@given(layer_inputs())
def test_select_slots_matches_a_loop_oracle(inputs):
    """Per row and head: exactly the clipped budget of distinct valid slots, every sink and recent
    slot among them, the highest scores (or the newest, without scores) for the rest, sorted by
    position; per-head ``[B, H, L]`` and per-layer ``[B, 1, L]`` scores, int or per-row sinks and
    recent windows, budgets out of range (clipped), rows keeping fewer than ``K`` (surplus ignored)."""
    plan, valid_counts, local, pos, seen = inputs
    result = select_slots(plan, valid_counts, local, pos, seen)
    assert result is not None
    check_selection(result, plan, valid_counts, local, pos, seen)


@settings(max_examples=40, deadline=None)
@given(layer_inputs(evict=False))
def test_select_slots_returns_none_when_no_row_evicts(inputs):
    plan, valid_counts, local, pos, seen = inputs
    assert select_slots(plan, valid_counts, local, pos, seen) is None
    assert select_slots(plan, valid_counts, local, pos, seen, shared_positions=True) is None


@settings(max_examples=60, deadline=None)
@given(layer_inputs(score_heads="none"))
def test_select_slots_without_scores_keeps_the_sinks_and_the_newest(inputs):
    """``scores=None`` (recency): a row keeps its sinks, then its newest tokens, exactly."""
    plan, valid_counts, local, pos, seen = inputs
    result = select_slots(plan, valid_counts, local, pos, seen)
    chosen = check_selection(result, plan, valid_counts, local, pos, seen)
    keep = clipped_keep(plan, valid_counts)
    sinks_plan, recent_plan = as_list(plan.sinks, len(keep)), as_list(plan.recent, len(keep))
    for b, heads in enumerate(chosen):
        recent = min(keep[b], recent_plan[b])
        sinks = min(keep[b] - recent, sinks_plan[b])
        for h, got in enumerate(heads):
            loc = local[b, h].tolist()
            valid = [s for s in range(len(loc)) if loc[s] >= 0]
            expected = {s for s in valid if loc[s] < sinks}
            for s in sorted(valid, key=lambda s: -loc[s]):  # newest first
                if len(expected) == keep[b]:
                    break
                expected.add(s)
            assert got == expected, (b, h)


@settings(max_examples=60, deadline=None)
@given(layer_inputs(shared=True, score_heads="layer"))
def test_select_slots_with_shared_positions_selects_once_per_row(inputs):
    """Every head holding the same tokens and per-layer scores ``[B, 1, L]``: one slot set per row
    (``H`` dimension 1), the one each head would have chosen on its own."""
    plan, valid_counts, local, pos, seen = inputs
    shared = select_slots(plan, valid_counts, local, pos, seen, shared_positions=True)
    check_selection(shared, plan, valid_counts, local, pos, seen, shared_positions=True)
    assert shared[0].shape[1] == 1
    no_ties = plan.scores.flatten().unique().numel() == plan.scores.numel()
    if no_ties:  # then the selection is unique: per head it is the same
        per_head = select_slots(plan, valid_counts, local, pos, seen)
        keep = shared[1]
        for b, k in enumerate(keep):
            for h in range(local.shape[1]):
                assert per_head[0][b, h, :k].tolist() == shared[0][b, 0, :k].tolist()


@settings(max_examples=30, deadline=None)
@given(layer_inputs(shared=True, score_heads="head"))
def test_select_slots_with_shared_positions_but_per_head_scores_selects_per_head(inputs):
    plan, valid_counts, local, pos, seen = inputs
    result = select_slots(plan, valid_counts, local, pos, seen, shared_positions=True)
    check_selection(result, plan, valid_counts, local, pos, seen, shared_positions=True)
    assert result[0].shape[1] == local.shape[1]


def test_select_slots_on_an_example_worked_out_by_hand():
    """Six tokens (row padded by 2), keep 3 with one sink and a recent window of one: token 0 (sink),
    token 5 (recent), and the best-scored of tokens 1 to 4 (token 1, score 9). A second row holding
    four tokens in scrambled slots (one slot empty) keeps 2 with no sink and no recent window: the
    two best scores (slots 0 and 4), sorted by position (slot 4 holds token 0, slot 0 token 3)."""
    local = torch.tensor([[[0, 1, 2, 3, 4, 5]], [[3, 1, -1, 2, 0, -1]]])
    pad = torch.tensor([2, 0]).view(2, 1, 1)
    pos = torch.where(local >= 0, local + pad, -1)
    scores = torch.tensor([[[0.0, 9, 1, 8, 2, 7]], [[6.0, 1, 99, 2, 5, 99]]])  # 99: on empty slots
    plan = Plan(keep=[3, 2], scores=scores, sinks=[1, 0], recent=[1, 0])
    index, keep = select_slots(plan, [6, 4], local, pos, seen=[6, 4])
    assert keep == [3, 2]
    assert index[0, 0].tolist() == [0, 1, 5]
    assert index[1, 0, :2].tolist() == [4, 0]
