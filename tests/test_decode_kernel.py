"""The Triton decode-attention kernel (``core/decode_kernel.py``) against its oracle, in Triton's interpreter.

The oracle (``decode_attention.reference``) dequantizes with the codec, builds the mask from the
definition (``masks.allowed``: a real, causal, in-window slot) and takes a float32 softmax over the
query heads expanded to their KV heads; it shares no code with the kernel. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly: the cases are small); the GPU's
bfloat16 products are checked in benchmarks/decode_kernel_check.py (docs/benchmarks/decode_kernel.md).
End to end, a frozen cache decoding through the kernel keeps the tokens of the SDPA path.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the decode kernel needs Triton: pip install triton")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from models import batch, tiny_model  # noqa: E402

from kvpolicy import ConfigError, make_cache  # noqa: E402
from kvpolicy.core import decode_attention, decode_kernel  # noqa: E402
from kvpolicy.core.layers import DynamicLayer, Fp8Codec, Int4Codec, Int8Codec, KVCodec  # noqa: E402
from kvpolicy.core.layers.frozen_ragged import FrozenRaggedLayer  # noqa: E402

if not decode_kernel.INTERPRETED:  # pragma: no cover - conftest.py sets the flag where there is no GPU
    pytest.skip("these tests run the kernel in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py "
                "on a machine without CUDA)", allow_module_level=True)

CODECS = {"auto": KVCodec(), "int8": Int8Codec(), "fp8": Fp8Codec()}


@st.composite
def layers(draw):
    """A frozen layer's buffers: some slots dropped (-1), a shared or per-head position row, left padding,
    a sliding window or none, and more capacity than filled slots."""
    b = draw(st.integers(1, 3))
    hkv = draw(st.sampled_from([1, 2, 3]))
    g = draw(st.sampled_from([1, 3, 4]))
    d = draw(st.sampled_from([16, 48, 64]))
    filled = draw(st.integers(1, 300))
    capacity = filled + draw(st.integers(0, 40))
    shared = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 80)))
    seed = draw(st.integers(0, 2**16))
    pads = draw(st.lists(st.integers(0, max(0, filled - 1)), min_size=b, max_size=b))
    return b, hkv, g, d, filled, capacity, shared, window, seed, pads


def buffers(case, codec, dtype=torch.float32):
    b, hkv, g, d, filled, capacity, shared, window, seed, pads = case
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(b, hkv * g, 1, d, generator=gen).to(dtype)
    keys = codec.encode(torch.randn(b, hkv, capacity, d, generator=gen).to(dtype) * 3)
    values = codec.encode(torch.randn(b, hkv, capacity, d, generator=gen).to(dtype))
    qpos = filled + 5  # positions run ahead of slots: some tokens were dropped earlier
    pos = torch.arange(qpos - filled + 1, qpos + 1).expand(b, 1 if shared else hkv, filled).clone()
    pos[torch.rand(pos.shape, generator=gen) < 0.2] = -1  # dropped slots
    pos[..., -1] = qpos  # the token being decoded is always there
    pos = torch.cat([pos, pos.new_full((*pos.shape[:2], capacity - filled), -1)], -1)
    pad = torch.tensor(pads) + (qpos - filled + 1)
    return query, keys, values, pos, pad, filled, qpos, window


@pytest.mark.parametrize("kv_dtype", list(CODECS))
@settings(max_examples=12, deadline=None)
@given(case=layers())
def test_the_kernel_matches_the_reference(kv_dtype, case):
    codec = CODECS[kv_dtype]
    query, keys, values, pos, pad, filled, qpos, window = buffers(case, codec)
    got = decode_attention.kernel_attention(query, keys, values, pos, pad, torch.tensor([filled]),
                                            torch.tensor([qpos + 1]), codec, window, None)
    want = decode_attention.reference(query, keys, values, pos, pad, filled, qpos, codec, window, None)
    assert got.shape == want.shape == (query.shape[0], 1, query.shape[1], query.shape[3])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_queries_and_keys_come_back_in_their_dtype(dtype):
    case = (2, 2, 4, 64, 700, 760, False, None, 3, [0, 9])  # 700 slots: several splits of the slots
    query, keys, values, pos, pad, filled, qpos, window = buffers(case, KVCodec(), dtype)
    assert decode_attention.splits_for(4, 760, query.device) > 1
    got = decode_attention.kernel_attention(query, keys, values, pos, pad, torch.tensor([filled]),
                                            torch.tensor([qpos + 1]), KVCodec(), window, 0.2)
    want = decode_attention.reference(query, keys, values, pos, pad, filled, qpos, KVCodec(), window, 0.2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_a_row_whose_slots_are_all_masked_gives_zeros_not_nans():
    case = (1, 1, 2, 16, 20, 20, True, None, 0, [0])
    query, keys, values, pos, pad, filled, qpos, _ = buffers(case, KVCodec())
    pad = torch.tensor([qpos + 1])  # every slot lies before the row's first real token
    got = decode_attention.kernel_attention(query, keys, values, pos, pad, torch.tensor([filled]),
                                            torch.tensor([qpos + 1]), KVCodec(), None, None)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize(("policy", "settings_"), [("full", {}), ("snapkv", dict(compression_ratio=0.5, window_size=4)),
                                                   ("h2o", dict(budget=16))])
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_a_frozen_cache_decodes_through_the_kernel_with_the_sdpa_tokens(policy, settings_, kv_dtype, monkeypatch):
    """The frozen (compiled-step) layers, run eagerly on the CPU, with ``decode_kernel="triton"`` against
    ``"sdpa"``: the same tokens, logits within float32 noise, the same kept slots."""
    model = tiny_model("llama", "sdpa", layers=2)  # 4 query / 2 KV heads: GQA groups of 2
    inputs = batch([30, 21, 40], seed=5)
    launches, launch = [], decode_kernel.launch
    monkeypatch.setattr(decode_kernel, "launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
    runs = {}
    for kernel in ("sdpa", "triton"):
        cache = make_cache(policy, kv_dtype=kv_dtype, compiled_decode=True, decode_kernel=kernel, **settings_)
        with torch.no_grad():
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                                 disable_compile=True)
        assert cache.is_frozen()
        assert len(launches) == (0 if kernel == "sdpa" else 5 * 2)  # 5 decode steps x 2 layers
        runs[kernel] = out, cache
    (want, want_cache), (got, got_cache) = runs["sdpa"], runs["triton"]
    assert torch.equal(want.sequences, got.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(want.logits, got.logits, strict=True)) < 1e-4
    for i in range(len(want_cache.layers)):
        assert torch.equal(want_cache.kept_positions(i), got_cache.kept_positions(i))


def test_bad_settings_name_the_fix():
    with pytest.raises(ConfigError, match="decode_kernel takes one of"):
        make_cache("full", decode_kernel="flash")
    with pytest.raises(ConfigError, match="use decode_kernel='auto' or 'sdpa'"):
        decode_attention.kernel_applies("triton", torch.zeros(1, 1, 1, 8), KVCodec(), {"softcap": 30.0})
    with pytest.raises(ConfigError, match=r"not the codec Int4Codec\(group=32\).*use decode_kernel='auto' or 'sdpa'"):
        decode_attention.kernel_applies("triton", torch.zeros(1, 1, 1, 64), Int4Codec(), {})


def test_auto_keeps_to_sdpa_on_the_cpu():
    """The interpreter is for tests: ``auto`` on CPU tensors never takes the (slow) interpreted kernel."""
    assert not decode_attention.kernel_applies("auto", torch.zeros(1, 1, 1, 8), KVCodec(), {})
    assert decode_attention.kernel_applies("triton", torch.zeros(1, 1, 1, 8), Int8Codec(), {})


@pytest.mark.parametrize(("policy", "settings_"), [
    ("kvzip", dict(compression_ratio=0.5)),
    ("snapkv_adakv", dict(compression_ratio=0.5, window_size=8)),
    ("pyramidinfer", dict(min_context_length=8, prefill_decay_ratio=0.7, exceed_length_to_compress=4)),
])
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_the_kernel_reads_frozen_segments_as_the_rectangle(policy, settings_, kv_dtype):
    """Head-ragged frozen layers (``layers/frozen_ragged.py``): the kernel's segment mode gives the tokens
    of the kernel over the rectangle kind, logits within float32 noise, pyramidinfer compacting between steps."""
    model = tiny_model("llama", "sdpa")
    inputs = batch([150, 97, 124], seed=5)
    runs = []
    for kind in (DynamicLayer, None):
        cache = make_cache(policy, kv_dtype=kv_dtype, compiled_decode=True, decode_kernel="triton", layer_kind=kind,
                           **settings_)
        with torch.no_grad():
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=10, min_new_tokens=10,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                                 disable_compile=True)
        runs.append((out, cache))
    (want, rect), (got, ragged) = runs
    assert any(isinstance(layer, FrozenRaggedLayer) and layer.packed for layer in ragged.layers)
    assert torch.equal(want.sequences, got.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(want.logits, got.logits, strict=True)) < 1e-4
    for a, b in zip(rect.layers, ragged.layers, strict=True):
        assert torch.equal(a.pos_view(), b.pos_view())
    assert ragged.memory_bytes(allocated=False) < rect.memory_bytes(allocated=False)


def test_the_codec_numbers_are_the_kernels():
    assert [decode_attention._code_of(c) for c in CODECS.values()] == [decode_kernel.PLAIN, decode_kernel.INT8,
                                                                       decode_kernel.FP8]
