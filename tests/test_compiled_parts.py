"""prefill(compile=...): the cache-free parts of a forward compiled (kvpolicy/compiled_parts.py).

Two questions: does the compiled prefill compute what the eager one does (same last logits, same
kept positions in every layer), and is everything put back afterwards (the model's modules and
the modeling file's RoPE function)? A counting backend runs the traced graphs as they are, so
families are cheap to cover; one case compiles with inductor, the backend a GPU run uses.
"""

from __future__ import annotations

import sys

import pytest
import torch

import kvpolicy
from kvpolicy.compiled_parts import ROTARY_FUNCTION, compiled_parts
from tests.models import attentions, batch, tiny_model


class CountingBackend:
    """A torch.compile backend that runs each traced graph unchanged and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def kept(cache) -> list[torch.Tensor]:
    return [layer.pos_view().clone() for layer in cache.layers]


def run(model, inputs, compile_option, policy="pyramidinfer_54_floor"):
    cache = kvpolicy.make_cache(policy)
    logits = kvpolicy.prefill(model, inputs["input_ids"], inputs["attention_mask"], cache, rows=2,
                              compile=compile_option)
    return logits, kept(cache)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2", "gemma3"])
def test_traced_parts_give_the_eager_prefill(family):
    torch._dynamo.reset()
    model = tiny_model(family, attentions(family)[-1])
    inputs = batch([40, 33, 37], seed=3)
    ref_logits, ref_kept = run(model, inputs, False)
    backend = CountingBackend()
    logits, kept_now = run(model, inputs, {"backend": backend, "dynamic": False})
    assert backend.graphs > 0, "nothing was compiled"
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    for a, b in zip(kept_now, ref_kept, strict=True):
        assert torch.equal(a, b)


def test_everything_is_put_back():
    model = tiny_model("llama", "sdpa")
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rotary = getattr(module, ROTARY_FUNCTION)
    with compiled_parts(model, {"backend": CountingBackend()}) as replaced:
        assert replaced == 4 * 3 + 1 + 1  # per layer: MLP and two norms; the final norm; RoPE
        assert getattr(module, ROTARY_FUNCTION) is not rotary
        assert "forward" in vars(model.model.layers[0].mlp)
    assert getattr(module, ROTARY_FUNCTION) is rotary
    for layer in model.model.layers:
        assert all("forward" not in vars(child) for child in layer.children())
    assert "forward" not in vars(model.model.norm)


def test_put_back_after_an_error():
    model = tiny_model("llama", "sdpa")
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rotary = getattr(module, ROTARY_FUNCTION)
    with pytest.raises(RuntimeError, match="boom"), compiled_parts(model, {"backend": CountingBackend()}):
        raise RuntimeError("boom")
    assert getattr(module, ROTARY_FUNCTION) is rotary
    assert "forward" not in vars(model.model.layers[0].mlp)


def test_inductor_prefill_matches_eager():
    torch._dynamo.reset()
    model = tiny_model("llama", "sdpa")
    inputs = batch([48, 41], seed=5)
    ref_logits, ref_kept = run(model, inputs, False, policy="snapkv")
    logits, kept_now = run(model, inputs, True, policy="snapkv")
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for a, b in zip(kept_now, ref_kept, strict=True):
        assert torch.equal(a, b)


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(kvpolicy.UnsupportedModelError, match="compile=False"), compiled_parts(torch.nn.Linear(2, 2)):
        pass
