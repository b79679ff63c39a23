"""Tiny random-initialised decoder models, one per supported family, for exact unit tests."""

from __future__ import annotations

import functools

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

#: Gemma's tiny layout: sliding and global layers alternate, and the window (8) is shorter than
#: the test prompts, so the sliding layers' masks really cut (tiny_model repeats the pattern)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"] * 2)

FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON),  # fused qkv projection; head_dim 64 / 4 = 16
    # softcapping of attention scores (50) and final logits (30) on, as in the real models
    "gemma2": lambda: Gemma2Config(**COMMON, **GEMMA),
    # q/k norms, a local RoPE base for sliding layers, no softcapping
    "gemma3": lambda: Gemma3TextConfig(**COMMON, **GEMMA),
}

#: attention implementations each family is tested with: transformers refuses sdpa for Gemma 2
#: (sdpa has no softcapping of attention scores)
ATTENTION = {"gemma2": ("eager",)}


def attentions(family: str) -> tuple[str, ...]:
    return ATTENTION.get(family, ("eager", "sdpa"))


def has_sliding_layers(family: str) -> bool:
    config = FAMILIES[family]()
    return any(t == "sliding_attention" for t in (getattr(config, "layer_types", None) or ()))


@functools.cache
def tiny_model(family: str = "llama", attn: str = "sdpa", layers: int = 4, seed: int = 0, window: int | None = None):
    """``window``: another sliding window for a family with sliding layers."""
    config = FAMILIES[family]()
    config.num_hidden_layers = layers
    if window is not None:
        config.sliding_window = window
    if getattr(config, "layer_types", None) is not None:  # the family's pattern, repeated to the depth
        types = config.layer_types
        config.layer_types = [types[i % len(types)] for i in range(layers)]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.eval()
    return model


def batch(lengths: list[int], seed: int = 0, vocab: int = 97) -> dict[str, torch.Tensor]:
    """Left-padded random prompts of the given lengths (tokens 3..vocab-1; 0 is the pad)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model, inputs, cache, new_tokens: int = 12):
    with torch.no_grad():
        out = model.generate(
            **inputs,
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, inputs["input_ids"].shape[1] :]
