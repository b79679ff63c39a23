"""The folded (GQA-aware) attention over kvpolicy layers computes what the expanded-KV route computes.

Reference: keys/values expanded to the query heads and a softmax written out in float64, with the
mask applied per query head; independent of SDPA and of the folding. Inside the models, the folded
route must be taken (a counter) and give the same logits as the model's own attention function fed
the expanded mask (the route every kvpolicy layer used before).
"""

from __future__ import annotations

import pytest
import torch
from models import batch, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from kvpolicy import make_cache
from kvpolicy.core import gqa_attention
from kvpolicy.generation import generate_static

TOL = 1e-5  # float32, |folded - reference| over values of order 1


def reference(query, key, value, allowed, scaling):
    """Softmax attention in float64 with KV heads expanded to the query heads."""
    b, hq, q, d = query.shape
    g = hq // key.shape[1]
    k = key.double().repeat_interleave(g, dim=1)
    v = value.double().repeat_interleave(g, dim=1)
    m = allowed.expand(b, allowed.shape[1], q, key.shape[2])
    if m.shape[1] > 1:
        m = m.repeat_interleave(g, dim=1)
    logits = torch.einsum("bhqd,bhld->bhql", query.double(), k) * scaling
    logits = logits.masked_fill(~m, float("-inf"))
    out = torch.einsum("bhql,bhld->bhqd", torch.softmax(logits, -1), v)
    return out.transpose(1, 2)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (6, 3)], ids=["gqa4", "mha", "gqa2"])
@pytest.mark.parametrize("q", [1, 5])
@pytest.mark.parametrize("shared", [False, True], ids=["per-kv-head-mask", "one-mask"])
@pytest.mark.parametrize("route", ["fold", "enable_gqa"])
def test_grouped_attention_matches_expanded_reference(hq, hkv, q, shared, route):
    gen = torch.Generator().manual_seed(hq * 100 + q * 10 + shared)
    b, length, d = 3, 37, 16
    query = torch.randn(b, hq, q, d, generator=gen)
    key = torch.randn(b, hkv, length, d, generator=gen)
    value = torch.randn(b, hkv, length, d, generator=gen)
    allowed = torch.rand(b, 1 if shared else hkv, q, length, generator=gen) > 0.4
    allowed[..., 0] = True  # every query row attends to something
    scaling = d**-0.5
    got = gqa_attention.grouped_attention(query, key, value, allowed, scaling, route=route)
    assert got.shape == (b, q, hq, d)
    want = reference(query, key, value, allowed, scaling)
    assert (got.double() - want).abs().max().item() < TOL
    # the mask matters: attending everywhere gives a clearly different answer
    everywhere = gqa_attention.grouped_attention(query, key, value, torch.ones_like(allowed), scaling, route=route)
    assert (everywhere - got).abs().max().item() > 100 * TOL


def test_per_query_head_mask_groups_like_repeat_kv():
    allowed = torch.tensor([True, False]).view(1, 2, 1, 1)  # KV head 0 attends, KV head 1 does not
    mask = gqa_attention.per_query_head_mask(allowed, 4, torch.float32, want_bool=True)
    assert mask.view(-1).tolist() == [True, True, False, False]  # query head h uses KV head h // 2
    additive = gqa_attention.per_query_head_mask(allowed, 4, torch.float32, want_bool=False)
    assert additive.view(-1)[1] == 0 and additive.view(-1)[2] == torch.finfo(torch.float32).min


def _sliding_gqa_model():
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=12, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def _mha_model():
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


MODELS = {
    "llama-gqa": lambda: tiny_model("llama", "sdpa"),
    "qwen3-gqa": lambda: tiny_model("qwen3", "sdpa"),
    "llama-mha": _mha_model,
    "mistral-sliding-gqa": _sliding_gqa_model,
}
POLICIES = {  # compress at these sizes, with layers of different lengths (pyramid) and per-head sets (snapkv)
    "pyramidinfer": dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4,
                         gen_recent_ratio=0.1, exceed_length_to_compress=4, gen_query_window=8),
    "snapkv": dict(compression_ratio=0.5, window_size=8),
    "h2o": dict(compression_ratio=0.5, window_size=4),
}


def _decode_logits(model, inputs, policy, settings, steps=6):
    cache = make_cache(policy, **settings)
    with torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits), cache


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_folded_route_equals_the_models_own_attention(model_name, policy, monkeypatch):
    model = MODELS[model_name]()
    inputs = batch([40, 27, 33], seed=3)  # left-padded rows
    calls = []
    real = gqa_attention.grouped_attention
    monkeypatch.setattr(gqa_attention, "grouped_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    folded, cache = _decode_logits(model, inputs, policy, POLICIES[policy])
    assert calls, "the grouped route was not taken"
    assert any(n < s for row in cache.valid_tokens_per_layer() for n, s in zip(row, cache.seen_tokens()))
    monkeypatch.setattr(gqa_attention, "applies", lambda impl, kwargs: False)  # the model's own function
    expanded, _ = _decode_logits(model, inputs, policy, POLICIES[policy])
    assert (folded - expanded).abs().max().item() < TOL


@pytest.mark.parametrize("model_name", ["llama-gqa", "mistral-sliding-gqa"])
def test_static_path_takes_the_folded_route(model_name, monkeypatch):
    model = MODELS[model_name]()
    inputs = batch([40, 27, 33], seed=4)
    calls = []
    real = gqa_attention.grouped_attention
    monkeypatch.setattr(gqa_attention, "grouped_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = generate_static(model, **inputs, policy="pyramidinfer", max_new_tokens=8, compile=False,
                          **POLICIES["pyramidinfer"])
    assert len(calls) == 7 * model.config.num_hidden_layers  # every decode step of every layer
    monkeypatch.setattr(gqa_attention, "applies", lambda impl, kwargs: False)
    again = generate_static(model, **inputs, policy="pyramidinfer", max_new_tokens=8, compile=False,
                            **POLICIES["pyramidinfer"])
    assert torch.equal(out.sequences, again.sequences)


def test_softcapped_attention_falls_back_to_the_models_function():
    assert not gqa_attention.applies("sdpa", {"scaling": 0.1, "softcap": 50.0})
    assert not gqa_attention.applies("eager", {"scaling": 0.1})
    assert gqa_attention.applies("sdpa", {"scaling": 0.1, "dropout": 0.0, "sliding_window": None, "softcap": None})


def test_gqa_decode_check_dry_run(tmp_path):
    """The GPU script runs end to end on CPU (tiny shape) and records its provenance."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gqa_decode_check.py"
    spec = importlib.util.spec_from_file_location("gqa_decode_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "gqa.json"
    script.main(["--shape", "tiny", "--batch", "3", "--prompt", "80", "--steps", "4", "--prefill-rows", "2", "--reps",
                 "2", "--policies", "snapkv", "--routes", "auto,fold,expanded", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {"commit", "dirty", "versions", "machine", "date"} <= set(data["meta"])
    assert [r["route"] for r in data["in_model"]] == ["auto", "fold", "expanded"]
    assert all(r["tokens_equal_to_auto"] for r in data["in_model"][1:])  # float32 on CPU: the same tokens
    assert all(r["rel_err_vs_expanded"] < 1e-5 for r in data["attention_alone"])
