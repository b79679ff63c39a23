"""Compress once, ask many: a context compressed without its question, then questions continuing
copies of the same compressed cache."""

from __future__ import annotations

import torch
from models import batch, tiny_model

import kvpolicy

SNAP = dict(compression_ratio=0.5, window_size=4)


def ask(model, context_ids, question, cache, new_tokens=6):
    ids = torch.cat([context_ids, question], 1)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              **{kvpolicy.cache_argument(model): cache}, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def compressed_context(model, context_ids):
    cache = kvpolicy.make_cache("snapkv", **SNAP)
    kvpolicy.prefill(model, context_ids, torch.ones_like(context_ids), cache)
    return cache


def test_each_question_on_a_copy_equals_compressing_again_and_leaves_the_original():
    model = tiny_model("llama", "sdpa")
    context = batch([60])["input_ids"]
    questions = [torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])]
    shared = compressed_context(model, context)
    kept_before = shared.valid_tokens_per_layer()
    positions_before = shared.kept_positions(1).clone()
    for q in questions:
        fresh = compressed_context(model, context)
        assert torch.equal(ask(model, context, q, shared.copy()), ask(model, context, q, fresh))
    assert shared.valid_tokens_per_layer() == kept_before == [[30]] * 4
    assert torch.equal(shared.kept_positions(1), positions_before)


def test_the_question_is_not_seen_by_the_compression():
    """snapkv compresses the first forward only: the context alone is halved, and the question's
    tokens, arriving later, are all kept (question in the prompt: they would be voted on too)."""
    model = tiny_model("llama", "sdpa")
    context = batch([60])["input_ids"]
    question = torch.tensor([[5, 6, 7, 8, 9]])
    cache = compressed_context(model, context)
    ask(model, context, question, cache, new_tokens=3)
    for layer in range(4):
        kept = cache.kept_positions(layer)[0, 0]
        assert (kept[kept >= 60] == torch.arange(60, 60 + 5 + 2)).all()  # question + 2 fed tokens, all kept
        assert int((kept[(kept >= 0) & (kept < 60)]).numel()) == 30


def test_a_compiled_cache_can_be_copied_and_continued():
    model = tiny_model("llama", "sdpa")
    context = batch([40])["input_ids"]
    q = torch.tensor([[5, 6, 7]])
    frozen = kvpolicy.make_cache("snapkv", compiled_decode=True, **SNAP)
    kvpolicy.prefill(model, context, torch.ones_like(context), frozen)
    assert frozen.is_frozen()
    eager = compressed_context(model, context)
    assert torch.equal(ask(model, context, q, frozen.copy()), ask(model, context, q, eager))
