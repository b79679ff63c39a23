"""A fixed, seeded set of needle-in-a-haystack prompts on real prose for the real-model tests."""

from __future__ import annotations

import random

import torch

from kvpolicy import cache_argument, make_cache
from kvpolicy.evaluation import texts

QUESTION = "What is the secret code of the blue door? Answer with the number only."
#: the needle set of tests/test_real_model.py (the one ``pyramidinfer_54_floor`` was chosen on)
TEST_SEED = 7


def build(tokenizer, count: int = 6, hay_tokens: int = 1550, seed: int = TEST_SEED):
    """Left-padded chat prompts (1.5k-2k tokens) with a 5-digit code placed in the first 40%."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for i in range(count):
        hay = texts.haystack(tokenizer, hay_tokens, rng, texts.source("austen"))  # what the records were made on
        code = str(rng.randrange(10000, 99999))
        depth = (0.1, 0.2, 0.3, 0.4)[i % 4]
        k = max(1, int(len(hay) * depth))
        doc = "\n\n".join(hay[:k] + [f"The secret code of the blue door is {code}."] + hay[k:])
        chat = [{"role": "user", "content": doc + "\n\n" + QUESTION}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(list(ids["input_ids"]))
        answers.append(code)
    width = max(map(len, prompts))
    input_ids = torch.full((count, width), tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}, answers, [len(p) for p in prompts]


def run(model, tokenizer, inputs, answers, lengths, policy: str, **overrides):
    """Greedy answers under ``policy``; returns (found per prompt, decoded answers, KV reduction)."""
    cache = make_cache(policy, **overrides)
    new = 20
    with torch.no_grad():
        out = model.generate(
            **inputs, **{cache_argument(model): cache}, max_new_tokens=new, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    decoded = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    found = [code in text for code, text in zip(answers, decoded)]
    kept = sum(sum(row) for row in cache.valid_tokens_per_layer())
    seen = len(cache.layers) * sum(cache.seen_tokens())  # generation may stop early at EOS
    return found, decoded, 1 - kept / seen
