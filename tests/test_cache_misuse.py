"""A cache pickled, trained through, or shared by two threads: what DynamicCache users try with a kvpolicy
cache (issue #26). Pickling works and the unpickled cache continues as the original; a backward pass
through a compressing cache and a second thread's forward are refused with the fix named."""

import pickle
import threading

import pytest
import torch
from models import batch, tiny_model

import kvpolicy
from kvpolicy import CacheMisuseError

POLICIES = [("full", {}), ("h2o", {"compression_ratio": 0.5}), ("pyramidinfer", {"compression_ratio": 0.5}),
            ("kvzip", {"compression_ratio": 0.5})]


def continue_generation(model, ids, mask, cache, new_tokens=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("compiled_decode", [False, True], ids=["eager", "frozen"])
@pytest.mark.parametrize("policy,settings", POLICIES, ids=[p for p, _ in POLICIES])
def test_a_pickled_cache_continues_as_the_original(policy, settings, compiled_decode):
    model = tiny_model("llama", "sdpa")
    inputs = batch([40, 27], seed=2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = kvpolicy.make_cache(policy, compiled_decode=compiled_decode, **settings)
    kvpolicy.prefill(model, ids, mask, cache)
    restored = pickle.loads(pickle.dumps(cache))
    assert restored.kv_tokens_per_layer() == cache.kv_tokens_per_layer()
    for layer in range(len(cache.layers)):
        assert torch.equal(restored.kept_positions(layer), cache.kept_positions(layer))
    assert torch.equal(continue_generation(model, ids, mask, restored), continue_generation(model, ids, mask, cache))


def test_backward_through_the_full_policy_works_and_a_compressing_one_is_refused():
    model = tiny_model("llama", "sdpa")
    model.train()
    ids = batch([40, 40], seed=1)["input_ids"]
    try:
        model(input_ids=ids, past_key_values=kvpolicy.make_cache("full")).logits.sum().backward()
        assert any(p.grad is not None for p in model.parameters())
        model.zero_grad()
        with pytest.raises(CacheMisuseError, match="torch.no_grad"):
            model(input_ids=ids, past_key_values=kvpolicy.make_cache("h2o", compression_ratio=0.5)).logits.sum()
    finally:
        model.eval()
        model.zero_grad()


def test_a_second_thread_on_a_filling_cache_is_refused():
    """Thread A's forward is held after its first layers; thread B's forward over the same cache is refused
    before it writes anything; A then finishes as a forward alone would."""
    model = tiny_model("llama", "sdpa")
    ids = batch([30, 30], seed=3)["input_ids"]
    with torch.no_grad():
        alone = model(input_ids=ids, past_key_values=kvpolicy.make_cache("full")).logits
    cache = kvpolicy.make_cache("full")
    reached, release = threading.Event(), threading.Event()
    owner = []

    def hold(module, args):
        if threading.get_ident() == owner[0]:
            reached.set()
            assert release.wait(60)

    handle = model.model.layers[2].register_forward_pre_hook(hold)
    result = {}

    def run_a():
        owner.append(threading.get_ident())
        with torch.no_grad():
            result["a"] = model(input_ids=ids, past_key_values=cache).logits

    a = threading.Thread(target=run_a)
    try:
        a.start()
        assert reached.wait(60)
        with pytest.raises(CacheMisuseError, match="another thread"), torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
    finally:
        release.set()
        a.join(60)
        handle.remove()
    assert torch.equal(result["a"], alone)
