"""A cache pickled, trained through, or shared by two threads: what DynamicCache users try with a kvpolicy
cache (issue #26). Pickling works and the unpickled cache continues as the original; a backward pass
through a compressing cache works; a second thread's forward is refused with the fix named."""

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


@pytest.mark.parametrize("policy,settings", POLICIES[:3], ids=[p for p, _ in POLICIES[:3]])
def test_backward_through_a_compressing_cache(policy, settings):
    """Training through a kvpolicy cache: the prompt's forward is exact (compression follows each layer's
    attention), so its gradients are the full cache's; a second forward over the compressed cache backpropagates
    too."""
    model = tiny_model("llama", "sdpa")
    ids = batch([40, 40], seed=1)["input_ids"]

    def grads(cache, steps):
        model.zero_grad()
        out = model(input_ids=ids, past_key_values=cache)
        loss = out.logits.sum()
        for _ in range(steps):  # more tokens over the (compressed) cache
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
            loss = loss + out.logits.sum()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    model.train()
    try:
        want = grads(kvpolicy.make_cache("full"), 0)
        got = grads(kvpolicy.make_cache(policy, compiled_decode=False, **settings), 0)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want, got))
        more = grads(kvpolicy.make_cache(policy, compiled_decode=False, **settings), 2)
        assert all(torch.isfinite(g).all() for g in more) and any(g.abs().sum() > 0 for g in more)
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
