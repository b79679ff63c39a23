"""``kv_dtype``: kept keys/values stored in 8 bits (int8 or fp8 codes with a float32 scale per vector) or in
4 (int4: asymmetric codes per group of channels, a bfloat16 scale and minimum per group).

The oracle is written here, apart from kvpolicy's codecs: transformers' own dynamic cache whose layers
store fake-quantized keys/values (quantize, dequantize at once: the "dequantize + attention" reference),
and the prompt's forward attending its keys exactly, as kvpolicy's quantized layers do. Every policy
runs at each dtype, eagerly and through the frozen (compiled-step) layers, batched and left-padded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from models import batch, tiny_model
from test_compiled_generate import compile_config, graphs
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache
from transformers.cache_utils import DynamicLayer as HFDynamicLayer

import kvpolicy
from kvpolicy import ConfigError, make_cache
from kvpolicy.core.layers import Fp8Codec, Int4Codec, Int8Codec
from kvpolicy.evaluation.runner import build_specs

#: each policy with settings that compress the tiny prompts (16-40 tokens)
POLICIES = {
    "full": {},
    "pyramidinfer": dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4,
                         exceed_length_to_compress=4),
    "h2o": dict(budget=16),
    "snapkv": dict(compression_ratio=0.5, window_size=4),
    "pyramidkv": dict(compression_ratio=0.5, window_size=4),
    "tova": dict(budget=16),
    "streamingllm": dict(budget=12),
    "knorm": dict(compression_ratio=0.5),
    "expected_attention": dict(compression_ratio=0.5),
    "random": dict(compression_ratio=0.5),
    "kvzip": dict(compression_ratio=0.5, chunk_size=16),
}
LENGTHS = [30, 21, 40]
#: int4 at the tiny models' head_dim (16): groups of 8 channels (``kv_dtype="int4"`` takes groups of 32)
INT4 = Int4Codec(group=8)


def fake_quant(x: torch.Tensor, code_max: float, fp8: bool) -> torch.Tensor:
    """The reference quantizer: per vector, scale = absmax / code_max in float32, never below float32's
    smallest normal number (a subnormal scale loses bits, and GPUs may flush it to zero); codes rounded to
    nearest (int8) or cast (float8_e4m3fn); dequantized back to ``x``'s dtype."""
    xf = x.float()
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.maximum(xf.abs().amax(-1, keepdim=True) / code_max, torch.tensor(tiny))
    scaled = xf / scale
    codes = scaled.to(torch.float8_e4m3fn).float() if fp8 else scaled.round()
    return (codes * scale).to(x.dtype)


def fake_quant_int4(x: torch.Tensor, group: int) -> torch.Tensor:
    """The reference int4 quantizer, written from its definition: per group of ``group`` channels, the
    minimum and the step (span / 15, made a little larger so the top code reaches the maximum) rounded to
    bfloat16, codes ``round((x - min) / step)`` in [0, 15]; a constant group keeps its minimum."""
    out = torch.empty(x.shape, dtype=torch.float32)
    flat, xf = out.view(-1, group), x.float().reshape(-1, group)
    for i, g in enumerate(xf):
        low = g.min().to(torch.bfloat16).float()
        span = (g.max() - low) / 15
        step = (span * (1 + 2.0**-7)).to(torch.bfloat16).float()
        if step == 0:  # a constant group, or a span too small for a bfloat16 step: the minimum alone
            step = torch.tensor(1.0)
        flat[i] = low + ((g - low) / step).round().clamp(0, 15) * step
    return out.to(x.dtype)


def reference_cache(kv_dtype) -> Cache:
    """transformers' dynamic cache storing fake-quantized keys/values; a layer's first forward attends
    its own keys exactly."""
    fp8 = kv_dtype == "fp8"
    code_max = 448.0 if fp8 else 127.0

    def quant(x):
        if isinstance(kv_dtype, Int4Codec) or kv_dtype == "int4":
            return fake_quant_int4(x, getattr(kv_dtype, "group", 32))
        return fake_quant(x, code_max, fp8)

    class FakeQuantLayer(HFDynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            first = not self.is_initialized
            keys, values = super().update(quant(key_states), quant(value_states), *args, **kwargs)
            return (key_states, value_states) if first else (keys, values)

    return Cache(layer_class_to_replicate=FakeQuantLayer)


def generate(model, inputs, cache, new_tokens=10, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                              **kwargs)


def logits_gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


# ------------------------------------------------------------------------------- the codecs


vectors = st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(vectors)
@example([2.7028483000636007e-38])  # absmax / 127 is subnormal: the scale stops at float32's tiny
def test_int8_codes_are_within_half_a_step_of_the_input(values):
    x = torch.tensor(values).view(1, 1, 1, -1)
    stored = Int8Codec().encode(x)
    assert stored.dtype == torch.int8 and stored.shape[-1] == x.shape[-1] + 4
    back = Int8Codec().decode(stored, torch.float32)
    step = x.abs().max().item() / 127
    assert (back - x).abs().max().item() <= step / 2 * (1 + 1e-5) + 1e-30
    assert torch.equal(back, fake_quant(x, 127.0, fp8=False))


@settings(max_examples=60, deadline=None)
@given(vectors)
@example([2.7028483000636007e-38, -1e-39])
def test_fp8_codes_keep_each_element_to_a_sixteenth(values):
    x = torch.tensor(values).view(1, 1, 1, -1)
    back = Fp8Codec().decode(Fp8Codec().encode(x), torch.float32)
    scale = x.abs().max().item() / 448
    # e4m3: 3 mantissa bits (half an ulp: 1/16 relative), subnormals spaced 2^-9 apart (in units of the scale)
    bound = x.abs() / 16 + scale * 2.0**-10
    assert ((back - x).abs() <= bound * (1 + 1e-5) + 1e-30).all()
    assert torch.equal(back, fake_quant(x, 448.0, fp8=True))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=8, max_size=8).flatmap(
    lambda head: st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=8, max_size=8).map(
        lambda tail: head + tail)))
@example([1e-3] * 15 + [1e4])
@example([5.0] * 16)
@example([0.0] * 7 + [1.1567e-40] + [0.0] * 8)  # a span whose step bfloat16 cannot hold
def test_int4_codes_are_within_half_a_step_of_their_group(values):
    """Each channel within half its group's step (span / 15) of the input, plus the bfloat16 rounding of the
    group's minimum; the bytes are 8 of codes and 2 x 2 x 2 of scales and minimums for 16 channels."""
    x = torch.tensor(values).view(1, 1, 1, -1)
    stored = INT4.encode(x)
    assert stored.dtype == torch.int8 and stored.shape[-1] == 16 // 2 + 4 * 2 == INT4.stored_width(16)
    back = INT4.decode(stored, torch.float32)
    for g in range(2):
        xs, bs = x[..., 8 * g: 8 * (g + 1)], back[..., 8 * g: 8 * (g + 1)]
        step = (xs.max() - xs.min()).item() / 15
        bound = step / 2 * (1 + 2.0**-6) + abs(xs.min().item()) * 2.0**-8
        assert (bs - xs).abs().max().item() <= bound + 1e-30
    assert torch.equal(back, fake_quant_int4(x, 8))


def test_a_zero_vector_stays_zero():
    for codec in (Int8Codec(), Fp8Codec(), INT4):
        assert torch.equal(codec.decode(codec.encode(torch.zeros(2, 16)), torch.float32), torch.zeros(2, 16))


def test_int4_rows_at_each_head_dim_and_their_inverse():
    for group, head_dim, width in [(32, 64, 40), (32, 128, 80), (32, 256, 160), (8, 16, 16), (16, 80, 60)]:
        codec = Int4Codec(group=group)
        assert codec.stored_width(head_dim) == width and codec.head_dim(width) == head_dim
    with pytest.raises(ConfigError, match=r"Int4Codec\(group=16\) as kv_dtype, or kv_dtype='int8'"):
        Int4Codec().stored_width(80)
    with pytest.raises(ConfigError, match="even number"):
        Int4Codec(group=3)


# ------------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", INT4], ids=["int8", "fp8", "int4"])
@pytest.mark.parametrize("compiled_decode", [False, True])
def test_full_cache_equals_the_dequantize_then_attend_reference(kv_dtype, compiled_decode):
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS, seed=5)
    expected = generate(model, inputs, reference_cache(kv_dtype))
    cache = make_cache("full", kv_dtype=kv_dtype, compiled_decode=compiled_decode)
    got = generate(model, inputs, cache)
    assert cache.is_frozen() is compiled_decode
    assert torch.equal(expected.sequences, got.sequences)
    assert logits_gap(expected, got) < 1e-5
    assert cache.layers[0].keys.dtype == torch.int8
    assert all(layer.attended is None for layer in cache.layers), "a forward's dequantized keys outlived it"


@pytest.mark.parametrize("kv_dtype, row_bytes", [("int8", 68), ("fp8", 68), ("int4", 40)])
def test_bfloat16_reference_and_exact_accounting(kv_dtype, row_bytes):
    """At head_dim 64 in bfloat16, each kept vector takes 64 code bytes and a 4-byte scale: 68 / 128 of
    the 16-bit bytes (int8 and fp8 alike); at int4 32 code bytes and two groups' scale and minimum (8 bytes):
    40 / 128; counted exactly by memory_bytes()."""
    config = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    inputs = batch(LENGTHS, seed=6)
    caches = {dt: make_cache("full", kv_dtype=dt, compiled_decode=False) for dt in ("auto", kv_dtype)}
    runs = {dt: generate(model, inputs, cache) for dt, cache in caches.items()}
    expected = generate(model, inputs, reference_cache(kv_dtype))
    assert torch.equal(expected.sequences, runs[kv_dtype].sequences)
    assert logits_gap(expected, runs[kv_dtype]) == 0.0
    held = caches[kv_dtype].memory_bytes(allocated=False)
    b, tokens = len(LENGTHS), max(LENGTHS) + 10 - 1  # the last generated token is never stored
    assert held == 2 * config.num_hidden_layers * b * config.num_key_value_heads * tokens * row_bytes
    assert held / caches["auto"].memory_bytes(allocated=False) == row_bytes / 128


# ------------------------------------------------------------------------------- every policy


@pytest.mark.filterwarnings("ignore::kvpolicy.policies.targets.CompressionTargetWarning")
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", INT4], ids=["int8", "fp8", "int4"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_keeps_the_prompt_s_choice_and_both_paths_agree(policy, kv_dtype):
    """The prompt attends and is scored by its exact keys, so every policy keeps after the prompt the very
    positions it keeps at the model's dtype; generation then decodes from 8-bit keys (logits within a
    bound of the 16-bit run's), the frozen layers of the compiled step token for token as the eager path."""
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS, seed=7)
    settings_ = POLICIES[policy]
    kept = {}
    for dt in ("auto", kv_dtype):
        cache = make_cache(policy, kv_dtype=dt, compiled_decode=False, **settings_)
        with torch.no_grad():
            model(**inputs, past_key_values=cache, use_cache=True)
        kept[dt] = [cache.kept_positions(i) for i in range(len(cache.layers))]
    if policy == "kvzip":  # scored by a second forward, which reads the prompt's keys as stored (8 bits):
        # the same budget over all layers (its global ranking), most of the same tokens
        count = {dt: sum(int((k >= 0).sum()) for k in kept[dt]) for dt in kept}
        pairs = [(a, b) for want, have in zip(kept["auto"], kept[kv_dtype], strict=True)
                 for a, b in zip(want.flatten(0, 1), have.flatten(0, 1))]  # per layer, row and head
        same = sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in pairs)
        assert count["auto"] == count[kv_dtype] and same >= 0.9 * count["auto"]
    else:
        for layer, (want, have) in enumerate(zip(kept["auto"], kept[kv_dtype], strict=True)):
            assert torch.equal(want, have), f"layer {layer}: the prompt's kept positions differ"
    if policy != "full":
        assert kept["auto"][-1].shape[-1] < max(LENGTHS), "the settings must compress for this test to mean much"
    base = generate(model, inputs, make_cache(policy, compiled_decode=False, **settings_))
    eager_cache = make_cache(policy, kv_dtype=kv_dtype, compiled_decode=False, **settings_)
    eager = generate(model, inputs, eager_cache)
    frozen_cache = make_cache(policy, kv_dtype=kv_dtype, compiled_decode=True, **settings_)
    frozen = generate(model, inputs, frozen_cache)
    assert frozen_cache.is_frozen()
    assert torch.equal(eager.sequences, frozen.sequences)
    assert logits_gap(eager, frozen) < 1e-5
    for i in range(len(eager_cache.layers)):
        assert torch.equal(eager_cache.kept_positions(i), frozen_cache.kept_positions(i))
    # the first generated token's logits come from the prompt's forward: exact; the second token's (the same
    # input token in both runs) is the first to read the 8-bit keys
    assert torch.equal(base.logits[0], eager.logits[0])
    gap = (base.logits[1] - eager.logits[1]).abs().max().item()
    # measured: int8 0.0008-0.0012, fp8 0.004-0.007, int4 (groups of 8) 0.009-0.016 (kvzip 0.05: its second
    # forward scores from the 4-bit keys, so it keeps other tokens)
    assert 0 < gap < {"int8": 0.005, "fp8": 0.03}.get(kv_dtype, 0.1)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", INT4], ids=["int8", "fp8", "int4"])
def test_the_compiled_step_traces_the_codes_in_one_graph(kv_dtype, fresh_dynamo):
    """Through generate's own compiled decode step (dynamo, fullgraph; forced on the CPU): the codes are
    written and read inside the graph, with the eager path's tokens."""
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS, seed=10)
    settings_ = dict(kv_dtype=kv_dtype, budget=16)
    expected = generate(model, inputs, make_cache("h2o", compiled_decode=False, **settings_), disable_compile=True)
    cache = make_cache("h2o", compiled_decode=True, **settings_)
    got = generate(model, inputs, cache, compile_config=compile_config())
    assert cache.is_frozen() and cache.layers[0].keys.dtype == torch.int8
    assert graphs() == 1, "the decode step was not captured as one graph"
    assert torch.equal(expected.sequences, got.sequences)
    assert logits_gap(expected, got) < 1e-5


def test_copy_multi_turn_and_row_chunks_at_int8():
    model = tiny_model("llama", "sdpa")
    inputs = batch(LENGTHS, seed=8)
    settings_ = dict(kv_dtype="int8", compiled_decode=False, budget=16)
    cache = make_cache("h2o", **settings_)
    first = generate(model, inputs, cache, new_tokens=5)
    twin = cache.copy()
    turn = {"input_ids": first.sequences,
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(3, 5, dtype=torch.long)], 1)}
    a, b = generate(model, turn, cache, new_tokens=5), generate(model, turn, twin, new_tokens=5)
    assert torch.equal(a.sequences, b.sequences) and logits_gap(a, b) == 0.0
    assert cache.layers[0].keys.dtype == torch.int8
    whole = generate(model, inputs, make_cache("h2o", **settings_))
    chunked_cache = make_cache("h2o", **settings_, prefill_rows=2)
    chunked = generate(model, inputs, chunked_cache)
    assert torch.equal(whole.sequences, chunked.sequences)
    assert chunked_cache.layers[0].keys.dtype == torch.int8


def test_beam_search_reorders_codes_and_scales_together():
    model = tiny_model("llama", "sdpa")
    inputs = batch([20, 14], seed=9)
    with torch.no_grad():
        want = model.generate(**inputs, past_key_values=reference_cache("int8"), max_new_tokens=6, num_beams=3,
                              do_sample=False, pad_token_id=0)
        got = model.generate(**inputs, past_key_values=make_cache("full", kv_dtype="int8", compiled_decode=False),
                             max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(want, got)


# ------------------------------------------------------------------------------- settings and errors


def test_the_setting_travels_through_presets_specs_and_copies(tmp_path):
    preset = tmp_path / "h2o_int8.yaml"
    preset.write_text("policy: h2o\nbudget: 32\nkv_dtype: int8\n")
    cache = make_cache(str(preset))
    assert cache.kv_dtype == "int8" and cache.policy.config.budget == 32
    assert make_cache(str(preset), kv_dtype="fp8").kv_dtype == "fp8"  # a keyword wins
    assert cache.empty_copy().kv_dtype == "int8"
    assert kvpolicy.PyramidCache(kv_dtype="fp8").kv_dtype == "fp8"
    specs = build_specs(["h2o"], [0.5], kv_dtypes=("auto", "int8"))
    assert [s.label for s in specs] == ["full", "full+int8", "h2o@0.5", "h2o+int8@0.5"]
    assert [s.is_reference for s in specs] == [True, False, False, False]
    assert [s.label for s in build_specs(["h2o"], [0.5], kv_dtypes=("fp8",))] == ["full", "full+fp8", "h2o+fp8@0.5"]


@pytest.mark.parametrize("kv_dtype, fix", [("int2", "takes one of 'auto', 'int8', 'fp8', 'int4'"),
                                           ("bf8", "takes one of 'auto'"), (8, "takes one of")])
def test_a_bad_kv_dtype_is_refused_naming_the_choices(kv_dtype, fix):
    with pytest.raises(ConfigError, match=fix):
        make_cache("full", kv_dtype=kv_dtype)


def test_fp8_without_torch_support_names_int8(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError, match="use kv_dtype='int8'"):
        make_cache("full", kv_dtype="fp8")


def test_a_model_dtype_the_codes_cannot_hold_is_refused():
    model = copy.deepcopy(tiny_model("llama", "eager")).to(torch.float64)
    with pytest.raises(ConfigError, match="load it in bfloat16"):
        generate(model, batch([8], seed=1), make_cache("full", kv_dtype="int8", compiled_decode=False), new_tokens=2)


def test_int4_at_a_head_dim_off_its_groups_names_a_group_that_fits():
    with pytest.raises(ConfigError, match=r"head_dim is 16.*Int4Codec\(group=16\) as kv_dtype, or kv_dtype='int8'"):
        generate(tiny_model("llama", "sdpa"), batch([8], seed=1), make_cache("full", kv_dtype="int4",
                                                                              compiled_decode=False), new_tokens=2)
