"""Every misuse gets an error that names the problem and the fix."""

import pytest
import torch
import transformers
from models import batch, greedy, tiny_model
from packaging.version import Version
from transformers import GPT2Config, GPT2LMHeadModel

import kvpolicy
from kvpolicy import CacheMisuseError, ConfigError, UnknownPolicyError, UnsupportedModelError, make_cache


def test_unknown_policy_lists_the_available_ones():
    with pytest.raises(UnknownPolicyError) as err:
        make_cache("pyramid_infer")
    message = str(err.value)
    assert "pyramid_infer" in message
    for name in ("full", "pyramidinfer", "h2o", "streamingllm", "snapkv", "random"):
        assert name in message


@pytest.mark.parametrize(
    "policy, overrides, field",
    [
        ("h2o", {"compression_ratio": 1.5}, "compression_ratio"),
        ("h2o", {"budget": 0}, "budget"),
        ("pyramidinfer", {"prefill_decay_ratio": 0.0}, "prefill_decay_ratio"),
        ("pyramidinfer", {"prefill_decay_strategy": "exponential"}, "prefill_decay_strategy"),
        ("snapkv", {"windw_size": 8}, "windw_size"),
    ],
)
def test_invalid_config_names_field_and_range(policy, overrides, field):
    with pytest.raises(ConfigError) as err:
        make_cache(policy, **overrides)
    message = str(err.value)
    assert field in message and policy in message
    if field == "compression_ratio":
        assert "less than 1" in message
    if field == "windw_size":
        assert "unknown setting" in message


def test_missing_preset_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no preset or file"):
        make_cache(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("compression_ratio: 0.5\n")
    with pytest.raises(ConfigError, match="'policy' key"):
        make_cache(str(bad))


def test_unsupported_model_type_names_supported_ones():
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97)
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(UnsupportedModelError) as err:
        greedy(model, batch([10]), make_cache("h2o", budget=4), new_tokens=2)
    message = str(err.value)
    assert "'gpt2'" in message and "llama" in message and "qwen3" in message


def test_unsupported_attention_implementation(monkeypatch):
    model = tiny_model("llama", "sdpa")
    monkeypatch.setattr(model.config, "_attn_implementation", "flex_attention", raising=False)
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        with torch.no_grad():
            model(**batch([8]), past_key_values=make_cache("h2o", budget=4))


OLD_TRANSFORMERS = Version(transformers.__version__) < Version("5.3")


@pytest.mark.parametrize("second_prompt", [30, 12])
def test_cache_reused_across_models(second_prompt):
    if second_prompt <= 13 and OLD_TRANSFORMERS:
        pytest.skip("transformers < 5.3 slices the prompt by the cached length and fails before the cache sees it")
    cache = make_cache("full")
    greedy(tiny_model("llama", "sdpa"), batch([12]), cache, new_tokens=2)
    with pytest.raises(CacheMisuseError, match="another model"):
        greedy(tiny_model("llama", "sdpa", seed=1), batch([second_prompt]), cache, new_tokens=2)
    cache2 = make_cache("full")
    greedy(tiny_model("llama", "sdpa"), batch([12]), cache2, new_tokens=2)
    with pytest.raises(CacheMisuseError, match="another model|new cache"):
        greedy(tiny_model("qwen3", "sdpa"), batch([second_prompt]), cache2, new_tokens=2)


def test_cache_reused_across_batch_sizes():
    model = tiny_model("llama", "sdpa")
    cache = make_cache("h2o", budget=8)
    greedy(model, batch([12, 9]), cache, new_tokens=2)
    with pytest.raises(CacheMisuseError, match="batch of 2 rows"):
        greedy(model, batch([30, 9, 5]), cache, new_tokens=2)


@pytest.mark.parametrize(
    "policy, overrides", [("full", {}), ("h2o", {"budget": 8}), ("pyramidinfer", {"min_context_length": 4})]
)
def test_cache_reused_for_a_shorter_prompt_names_the_fix(policy, overrides):
    """generate treats a filled cache as the start of the next input and runs only the tokens after it:
    a new prompt of 9 tokens on a cache holding 22 leaves none, which transformers (and a DynamicCache)
    answer with 'cannot reshape tensor of 0 elements'. kvpolicy says what happened and what to do."""
    if OLD_TRANSFORMERS:
        pytest.skip("transformers < 5.3: generate reads attention_mask[:, -1] of the empty slice before the cache")
    model = tiny_model("llama", "sdpa")
    cache = make_cache(policy, **overrides)
    greedy(model, batch([20, 16]), cache, new_tokens=3)  # holds 20 + 2 tokens per row
    with pytest.raises(CacheMisuseError) as err:
        greedy(model, batch([9, 6]), cache, new_tokens=3)
    message = str(err.value)
    assert "holds 22 tokens" in message
    assert "new cache per generate call" in message and "cache.reset()" in message
    cache.reset()  # the fix it names works
    fresh = greedy(model, batch([9, 6]), make_cache(policy, **overrides), new_tokens=3)
    assert torch.equal(greedy(model, batch([9, 6]), cache, new_tokens=3), fresh)


def test_empty_prompt_names_the_fix():
    model = tiny_model("llama", "sdpa")
    if not OLD_TRANSFORMERS:  # transformers < 5.3's generate fails on the empty mask before the cache sees it
        with pytest.raises(CacheMisuseError) as err:
            greedy(model, batch([0]), make_cache("pyramidinfer"), new_tokens=2)  # input_ids of shape [1, 0]
        assert "prompt is empty" in str(err.value) and "at least one token" in str(err.value)
    # a batch of empty rows through the model's forward; generate itself fails for a batch > 1 before the
    # cache is consulted (transformers' right-padding check reads attention_mask[:, -1])
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(CacheMisuseError, match="prompt is empty.*at least one token"):
        with torch.no_grad():
            model(input_ids=empty, attention_mask=empty, past_key_values=make_cache("h2o", budget=4))


def test_update_with_no_tokens_is_refused():
    """The same check where the keys arrive (a model whose forward does not fail first on no tokens)."""
    cache = make_cache("full")
    nothing = torch.zeros(1, 2, 0, 16)
    with pytest.raises(CacheMisuseError, match="prompt is empty"):
        cache.update(nothing, nothing, 0)


def test_reset_makes_a_cache_reusable():
    model = tiny_model("llama", "sdpa")
    cache = make_cache("full")
    first = greedy(model, batch([12]), cache, new_tokens=3)
    cache.reset()
    again = greedy(model, batch([12]), cache, new_tokens=3)
    assert torch.equal(first, again)


def test_crop_of_compressed_layer_is_refused():
    model = tiny_model("llama", "sdpa")
    cache = make_cache("streamingllm", budget=6, sink_size=2, window_size=2)
    greedy(model, batch([20]), cache, new_tokens=2)
    with pytest.raises(CacheMisuseError, match="full"):
        cache.crop(10)


def test_errors_share_a_base_class():
    for cls in (UnknownPolicyError, ConfigError, UnsupportedModelError, CacheMisuseError):
        assert issubclass(cls, kvpolicy.KVPolicyError)


def test_cache_argument_names_what_the_installed_transformers_takes():
    """Passing the cache under kvpolicy.cache_argument(model) works and draws no deprecation warning
    (transformers >= 5.24 renamed past_key_values to cache)."""
    import inspect
    import warnings

    model = tiny_model("llama", "sdpa")
    name = kvpolicy.cache_argument(model)
    assert name in inspect.signature(model.forward).parameters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(**batch([12]), **{name: kvpolicy.make_cache("full")}, max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_a_dropped_cache_frees_its_tensors_without_the_cycle_collector():
    """Layers point back at their cache weakly: a cache dropped by its user (its GPU memory with it)
    is freed at once, not whenever Python's cycle collector next runs."""
    import gc
    import weakref

    model = tiny_model()
    inputs = batch([20, 20])
    cache = kvpolicy.make_cache("pyramidinfer", min_context_length=4)
    with torch.no_grad():
        model(**inputs, use_cache=True, **{kvpolicy.cache_argument(model): cache})
    keys = weakref.ref(cache.layers[0].keys)
    gc.disable()
    try:
        del cache
        assert keys() is None
    finally:
        gc.enable()
