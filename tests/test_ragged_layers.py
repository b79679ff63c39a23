"""The head-ragged layer kind (``core/layers/ragged.py``): what it stores and what it gives back.

Two oracles: the rectangle a random packed layer came from (the store rebuilds it column for column, through
appends and growth), and the rectangular :class:`DynamicLayer` running the same generation (the same tokens
and logits bit for bit, the same kept positions), whose valid slots per (row, KV head) count the bytes the
ragged kind must hold: no more than those plus its headroom.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import batch, tiny_model

from kvpolicy import make_cache
from kvpolicy.core.layers import DynamicLayer, FreezeSpec, RaggedLayer, RaggedStore
from kvpolicy.core.layers.frozen_ragged import FrozenRaggedLayer

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- the store alone


@st.composite
def rectangles(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    width = draw(st.integers(0, 9))
    lens = [[draw(st.integers(0, width)) for _ in range(h)] for _ in range(b)]
    holes = draw(st.booleans())  # some kept slot inside a head marked empty (the store keeps it as it is)
    headroom = draw(st.integers(0, 3))
    appends = draw(st.lists(st.integers(1, 4), max_size=4))
    return b, h, width, lens, holes, headroom, appends


@given(rectangles())
def test_a_packed_store_rebuilds_its_rectangle_through_appends_and_growth(case):
    b, h, width, lens, holes, headroom, appends = case
    g = torch.Generator().manual_seed(width * 7 + b * 3 + h)
    d = 5
    keys, values = torch.randn(b, h, width, d, generator=g), torch.randn(b, h, width, d, generator=g)
    ramp = torch.arange(width).expand(b, h, width)
    lens_t = torch.tensor(lens).view(b, h, 1)
    pos = torch.where(ramp < lens_t, ramp * 2 + 1, -1)
    if holes and width:
        pos[..., 0] = torch.where(lens_t[..., 0] > 1, -1, pos[..., 0])
    acc = torch.rand(b, h, width, generator=g)
    store = RaggedStore.pack(keys, values, pos, acc, headroom)
    want_k, want_v, want_p = keys, values, pos
    want_a = acc.masked_fill(pos < 0, 0.0)
    for q in appends:
        nk, nv = torch.randn(b, h, q, d, generator=g), torch.randn(b, h, q, d, generator=g)
        npos = torch.arange(100, 100 + q).expand(b, h, q) + 10 * store.appended
        store.append(nk, nv, npos, headroom)
        want_k, want_v = torch.cat([want_k, nk], 2), torch.cat([want_v, nv], 2)
        want_p, want_a = torch.cat([want_p, npos], 2), torch.cat([want_a, torch.zeros(b, h, q)], 2)
    got_k, got_v, got_p, got_a = store.rectangle()
    assert store.length == want_p.shape[2]
    assert torch.equal(got_p, want_p)
    valid = (want_p >= 0).unsqueeze(-1)
    assert torch.equal(got_k * valid, want_k * valid) and torch.equal(got_v * valid, want_v * valid)
    assert torch.equal(got_a.masked_fill(want_p < 0, 0.0), want_a.masked_fill(want_p < 0, 0.0))
    # what it holds: each head's slots up to its last kept one, and every append; no padding
    held = sum(n for row in lens for n in row) + b * h * sum(appends)
    assert store.stored_entries(allocated=False) == held
    assert store.stored_entries(allocated=True) >= held and store.room() >= 0


# ------------------------------------------------------------------------------- against the rectangle


def generate(model, inputs, cache, new_tokens):
    with torch.no_grad():
        return model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def same_run(a, b) -> bool:
    return torch.equal(a.sequences, b.sequences) and all(torch.equal(x, y) for x, y in
                                                          zip(a.logits, b.logits, strict=True))


CASES = [
    ("kvzip", dict(compression_ratio=0.5)),
    ("snapkv_adakv", dict(compression_ratio=0.5, window_size=8)),
    ("pyramidkv_adakv", dict(compression_ratio=0.6, window_size=8)),
    ("snapkv", dict(compression_ratio=0.5, window_size=8)),  # heads even, rows of different lengths
    ("pyramidinfer", dict(min_context_length=8, prefill_decay_ratio=0.7, exceed_length_to_compress=8)),
    ("h2o", dict(budget=130)),  # compacted every step, accumulated attention beside; a row shorter than it
]


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
@pytest.mark.parametrize("name, settings", CASES, ids=[c[0] for c in CASES])
def test_the_ragged_kind_gives_the_rectangles_tokens_and_stores_no_padding(name, settings, kv_dtype):
    model = tiny_model("llama", "sdpa")
    inputs = batch([150, 97, 124], seed=5)
    rect = make_cache(name, layer_kind=DynamicLayer, compiled_decode=False, kv_dtype=kv_dtype, **settings)
    ragged = make_cache(name, compiled_decode=False, kv_dtype=kv_dtype, **settings)  # the default kind
    want, got = generate(model, inputs, rect, 24), generate(model, inputs, ragged, 24)
    assert all(type(layer) is RaggedLayer for layer in ragged.layers)
    assert same_run(want, got)
    assert ragged.valid_tokens_per_layer() == rect.valid_tokens_per_layer()
    for a, b in zip(rect.layers, ragged.layers, strict=True):
        assert torch.equal(a.pos_view(), b.pos_view())
    assert any(layer.packed for layer in ragged.layers), "no layer was left with padding to free"
    d = model.config.head_dim if hasattr(model.config, "head_dim") else 16
    per_vector = 2 * (d * 4 if kv_dtype == "auto" else d + 4)  # a key and a value: float32, or int8 codes + scale
    for a, b in zip(rect.layers, ragged.layers, strict=True):
        if b.packed:  # each (row, KV head) stores its valid slots (none empty inside), no padding
            assert b.kv_bytes(allocated=False) == int((a.pos_view() >= 0).sum()) * per_vector
        else:
            assert b.kv_bytes(allocated=False) == a.kv_bytes(allocated=False)
    assert ragged.memory_bytes(allocated=False) < rect.memory_bytes(allocated=False)


@pytest.mark.parametrize("name, settings", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_a_prefill_in_row_chunks_stores_no_padding(name, settings):
    """The chunks' layers are joined and packed again (before, the joined layers were rectangles holding every
    head's padding): each packed layer stores its valid slots and no more. kvzip also keeps the one-forward
    prefill's positions; Ada-KV's head budgets move a few slots with the chunks' padding widths in the
    rectangle kind too (and may change a token), so for them only the bytes are checked."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([150, 97, 124, 140], seed=6)
    whole = make_cache(name, compiled_decode=False, **settings)
    chunked = make_cache(name, compiled_decode=False, prefill_rows=2, **settings)
    want, got = generate(model, inputs, whole, 12), generate(model, inputs, chunked, 12)
    assert any(layer.packed for layer in chunked.layers)
    per_vector = 2 * model.config.head_dim * 4
    for layer in chunked.layers:
        if layer.packed:
            assert layer.kv_bytes(allocated=False) == int((layer.pos_view() >= 0).sum()) * per_vector
    if name == "kvzip":
        assert torch.equal(want.sequences, got.sequences)
        for a, b in zip(whole.layers, chunked.layers, strict=True):  # each (row, KV head) keeps the same positions
            for x, y in zip(a.pos_view().flatten(0, 1), b.pos_view().flatten(0, 1), strict=True):
                assert torch.equal(x[x >= 0], y[y >= 0])
        assert chunked.memory_bytes(allocated=False) == whole.memory_bytes(allocated=False)


def test_after_packing_a_row_reorder_a_copy_a_freeze_and_a_second_turn_match_the_rectangle():
    model = tiny_model("llama", "sdpa")
    inputs = batch([140, 101], seed=9)
    caches = [make_cache("kvzip", layer_kind=kind, compiled_decode=False, compression_ratio=0.5)
              for kind in (DynamicLayer, RaggedLayer)]
    for cache in caches:
        generate(model, inputs, cache, 6)
    rect, ragged = caches
    assert all(layer.packed for layer in ragged.layers)
    rect_twin, twin = rect.copy(), ragged.copy()
    assert twin.memory_bytes() == ragged.memory_bytes() and all(layer.packed for layer in twin.layers)
    for cache in (rect, ragged):
        cache.reorder_cache(torch.tensor([1, 0]))
    for a, b in zip(rect.layers, ragged.layers, strict=True):
        valid = (a.pos_view() >= 0).unsqueeze(-1)  # what padding columns hold is never read
        assert torch.equal(a.pos_view(), b.pos_view()) and torch.equal(a.keys_view() * valid, b.keys_view() * valid)
    # a second turn (a forward of several tokens) on the copy, against the rectangle's own copy
    follow = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    runs = []
    for cache in (rect_twin, twin):
        cache.reorder_cache(torch.tensor([1, 0]))
        ids = torch.cat([inputs["input_ids"].flip(0), torch.zeros(2, 6, dtype=torch.long), follow], 1)
        mask = torch.cat([inputs["attention_mask"].flip(0), torch.ones(2, 15, dtype=torch.long)], 1)
        with torch.no_grad():
            runs.append(model(input_ids=ids[:, -9:], attention_mask=mask, past_key_values=cache).logits)
    assert torch.equal(*runs)
    # frozen for the compiled step and thawed back: the ragged kind again, the same slots
    frozen = ragged.layers[0].to_frozen(FreezeSpec(ragged.layers[0].length + 4))
    thawed = frozen.to_dynamic()
    assert type(thawed) is RaggedLayer and torch.equal(thawed.pos_view(), rect.layers[0].pos_view())


# ------------------------------------------------------------------------------- frozen as segments


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
@pytest.mark.parametrize("name, settings", CASES, ids=[c[0] for c in CASES])
def test_frozen_segments_decode_the_rectangles_tokens_and_keep_the_bytes_freed(name, settings, kv_dtype):
    """The compiled step's layers (``compiled_decode=True``, run eagerly on the CPU, where attention gathers
    the rectangle for SDPA): a packed layer freezes as segments (H2O's accumulated attention excepted) and
    decodes, compacting between steps where the policy does, with the frozen rectangle's tokens and logits
    bit for bit, its kept positions, and no padding stored."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([150, 97, 124], seed=5)
    rect = make_cache(name, layer_kind=DynamicLayer, compiled_decode=True, kv_dtype=kv_dtype, **settings)
    ragged = make_cache(name, compiled_decode=True, kv_dtype=kv_dtype, **settings)
    want, got = generate(model, inputs, rect, 24), generate(model, inputs, ragged, 24)
    assert rect.is_frozen() and ragged.is_frozen()
    assert same_run(want, got)
    for a, b in zip(rect.layers, ragged.layers, strict=True):
        assert torch.equal(a.pos_view(), b.pos_view())
    segments = [layer for layer in ragged.layers if isinstance(layer, FrozenRaggedLayer) and layer.packed]
    if name == "h2o":
        assert not segments, "H2O's accumulated attention is summed in a rectangle"
        return
    assert segments, "no layer decoded as segments"
    d = model.config.head_dim if hasattr(model.config, "head_dim") else 16
    per_vector = 2 * (d * 4 if kv_dtype == "auto" else d + 4)
    for a, b in zip(rect.layers, ragged.layers, strict=True):
        if b in segments:
            assert b.kv_bytes(allocated=False) == int((a.pos_view() >= 0).sum()) * per_vector
    assert ragged.memory_bytes(allocated=False) < rect.memory_bytes(allocated=False)
    assert ragged.memory_bytes(allocated=True) < rect.memory_bytes(allocated=True)


def test_frozen_segments_keep_their_addresses_through_steps_and_compactions():
    """What a recorded CUDA graph needs: the buffers and the segment tensors the step reads stay the same
    objects while the layer decodes and compacts in place (pyramidinfer compacts every few steps)."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([150, 97, 124], seed=5)
    settings = dict(min_context_length=8, prefill_decay_ratio=0.7, exceed_length_to_compress=8)
    cache = make_cache("pyramidinfer", compiled_decode=True, decode_reserve=64, **settings)
    generate(model, inputs, cache, 1)
    layer = next(layer for layer in cache.layers if isinstance(layer, FrozenRaggedLayer) and layer.packed)
    held = [t.data_ptr() for t in (layer._store.keys, layer._store.pos, layer.seg_start, layer.seg_end)]
    length = layer.length
    with torch.no_grad():  # continue the same cache for 20 more steps
        ids = torch.randint(3, 97, (3, 1), generator=torch.Generator().manual_seed(1))
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
        for _ in range(20):
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    assert layer.packed and layer.length < length + 20, "the layer did not compact while decoding"
    assert [t.data_ptr() for t in (layer._store.keys, layer._store.pos, layer.seg_start, layer.seg_end)] == held
