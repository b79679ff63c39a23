"""Large batches in one call: ``model.generate(..., past_key_values=make_cache(name, prefill_rows=n))`` runs the
prompt's forward ``n`` rows at a time and gives the tokens of the one-forward prefill, greedy and sampled, eager
and through the compiled decode step (issue #26)."""

import pytest
import torch
from models import batch, tiny_model
from test_compiled_generate import compile_config

import kvpolicy
from kvpolicy import ConfigError

LENGTHS = [37, 22, 40, 9, 31]
POLICIES = {
    "full": {},
    "pyramidinfer": dict(compression_ratio=0.5),
    "h2o": dict(budget=16),
    "kvzip": dict(compression_ratio=0.5, chunk_size=16),
}
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)


def generate(model, cache, compiled: bool, seed: int = 0, **settings):
    extra = {"compile_config": compile_config()} if compiled else {"disable_compile": True}
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**batch(LENGTHS, seed=6), past_key_values=cache, max_new_tokens=8, min_new_tokens=8,
                              pad_token_id=0, **extra, **settings)


def forward_rows(model):
    """The batch size of every decoder forward (a hook on the first decoder layer)."""
    seen = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    return seen, handle


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_one_call_in_row_chunks_gives_the_one_forward_tokens(policy, compiled, fresh_dynamo):
    model = tiny_model("llama", "sdpa")
    settings = POLICIES[policy]
    expected = generate(model, kvpolicy.make_cache(policy, compiled_decode=compiled, **settings), compiled,
                        do_sample=False)
    seen, handle = forward_rows(model)
    try:
        got = generate(model, kvpolicy.make_cache(policy, compiled_decode=compiled, prefill_rows=2, **settings),
                       compiled, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(got, expected)
    prompt_forwards = [n for n in seen if n != len(LENGTHS)]  # (KVzip's scoring pass adds forwards per chunk)
    assert prompt_forwards[:2] == [2, 2] and 1 in prompt_forwards and max(prompt_forwards) == 2, (
        f"the prompt's forwards ran over {seen} rows")
    if not compiled:  # (a compiled step runs no Python hook)
        assert max(seen) == len(LENGTHS), "decoding runs over the whole batch"


def test_sampling_in_row_chunks_draws_the_one_forward_tokens(fresh_dynamo):
    model = tiny_model("llama", "sdpa")
    settings = POLICIES["pyramidinfer"]
    expected = generate(model, kvpolicy.make_cache("pyramidinfer", compiled_decode=True, **settings), True, seed=4,
                        **SAMPLING)
    got = generate(model, kvpolicy.make_cache("pyramidinfer", compiled_decode=True, prefill_rows=3, **settings),
                   True, seed=4, **SAMPLING)
    assert torch.equal(got, expected)


def test_prefill_rows_is_validated_and_refuses_outputs_it_cannot_give():
    with pytest.raises(ConfigError, match="prefill_rows takes a positive number"):
        kvpolicy.make_cache("full", prefill_rows=0)
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ConfigError, match="without prefill_rows"), torch.no_grad():
        model(**batch(LENGTHS), past_key_values=kvpolicy.make_cache("full", prefill_rows=2), output_hidden_states=True)
