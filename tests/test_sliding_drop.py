"""The cache frees, in a sliding-window layer, the tokens no later query can see (every policy, ``full`` too).

transformers' ``DynamicSlidingWindowLayer`` keeps the last ``window - 1`` tokens of a sliding layer; a
``PolicyCache`` frees the rest after the layer's attention (and the policy's plan): all of it after a forward of
several tokens (the prompt), and while decoding once it numbers ``dead_group(window)`` (an eighth of the window,
one token for the tiny windows here but 3 for the window of 24). Checked here, on the tiny Gemma 3 and Mistral of
tests/test_oracle.py (window 12, left-padded prompts of 31-48 tokens) and a tiny Gemma 3 with a window of 24:

* **what goes is dead**: a spy on the cache's drop compares each layer's kept positions before and after it: only
  positions no later query can see go, and all of them (not a live token, not one too few);
* **the bound**: after the prompt a sliding layer holds no position before ``newest - window + 2`` (its next
  query's window), and while decoding at most ``dead_group - 1`` more;
* **the answer is right**: every decode step's logits equal test_oracle.py's independent route (a plain
  DynamicCache of the kept keys, a mask built from the kept positions); and where the policy's decisions cannot
  depend on what it kept beyond the window (``full`` and the prompt-only plans), every step equals the same
  policy with the drop off, and ``full`` equals transformers' own cache;
* the compiled (frozen) decode path frees between steps and keeps what the eager path keeps, in buffers sized to
  the bound; a ``copy()`` continued by a second turn, and assisted decoding (``crop``), stay right.
"""

from __future__ import annotations

import functools

import pytest
import test_oracle as oracle
import torch
from models import tiny_model
from test_oracle import TOL, Run, check_step, sliding_windows
from transformers import DynamicCache

import kvpolicy
from kvpolicy.core.compressor import dead_group
from kvpolicy.core.errors import CacheMisuseError

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "gemma3": lambda: oracle.gemma3("sdpa"),
    "mistral": lambda: oracle.mistral("eager"),
    "gemma3-w24": lambda: tiny_model("gemma3", "sdpa", window=24),  # dead_group 3: drops in groups
}
POLICIES = ["full", "snapkv", "h2o", "pyramidinfer", "pyramidinfer-kv_head", "tova", "streamingllm", "kvzip",
            "snapkv-adaptive"]
#: plans that run on the prompt only: the drop (after the plan) cannot change what they keep
PROMPT_ONLY = {"full", "snapkv", "kvzip", "snapkv-adaptive"}
STEPS = 10


def held(layer) -> list[list[set[int]]]:
    """Absolute positions of the real tokens (not pads, not empty) ``layer`` holds, per row and KV head."""
    pos, pad = layer.pos_view(), layer.rows.pad_host
    return [[{p for p in pos[b, h].tolist() if p >= pad[b]} for h in range(pos.shape[1])] for b in range(pos.shape[0])]


def spy_on_drops(cache) -> list[str]:
    """Wrap the cache's drop: every call checks that each sliding layer lost only dead positions (before
    ``total_seen - window + 1``), and all of them where it lost any. Returns a log of the drops that freed."""
    compressor, log = cache.compressor, []
    real = compressor.free_out_of_window

    def spy(layers, binding, force=False, cropped=False):
        before = [(layer, layer.total_seen, held(layer)) for layer in layers
                  if layer.holds_tokens and layer.window is not None]
        real(layers, binding, force, cropped)
        for layer, seen, was in before:
            floor = seen - layer.window + 1
            now = held(layer)
            for b, (rows_was, rows_now) in enumerate(zip(was, now)):
                for h, (a, z) in enumerate(zip(rows_was, rows_now)):
                    where = f"layer {layer.layer_idx} row {b} head {h} at {seen} columns"
                    assert z <= a, f"{where}: the drop added positions {z - a}"
                    gone = a - z
                    assert all(p < floor for p in gone), f"{where}: freed live positions {sorted(gone)}"
                    if gone or force:
                        assert all(p >= floor for p in z), f"{where}: kept dead {sorted(p for p in z if p < floor)}"
            if was != now:
                log.append(f"layer {layer.layer_idx} at {seen}")

    compressor.free_out_of_window = spy
    return log


def assert_bound(cache, model, slack: bool) -> None:
    """No sliding layer holds a real token its next query cannot see (``slack``: but ``dead_group - 1`` of them)."""
    tokens = cache.kv_tokens_per_layer()  # (on the frozen path, first applies the plans and drop a step left due)
    columns = cache.get_seq_length()
    for idx, window in enumerate(sliding_windows(model.config)):
        if window is None:
            continue
        floor = columns - window + 1 - (dead_group(window) - 1 if slack else 0)
        layer = cache.layers[idx]
        old = [sorted(p for p in s if p < floor) for row in held(layer) for s in row]
        assert not any(old), f"layer {idx} holds positions {old} before {floor} ({columns} columns, window {window})"
        if not slack:
            assert tokens[idx] <= window - 1


def twin(model, case: str, **settings) -> Run:
    """The same run with the cache's drop off: it keeps what leaves the window (masked)."""
    return Run(model, case, frees_out_of_window=False, **settings)


@pytest.mark.parametrize("path", ["eager", "frozen"])
@pytest.mark.parametrize("case", POLICIES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_sliding_layers_free_only_and_all_of_what_left_the_window(name, case, path, monkeypatch):
    model = MODELS[name]()
    settings = dict(compiled_decode=path == "frozen")  # frozen: the compiled path's layers, stepped eagerly
    logs = []
    real_make = kvpolicy.make_cache

    def make_cache(*args, **kwargs):  # the spy must be on before the prompt's forward, which Run makes at once
        cache = real_make(*args, **kwargs)
        logs.append(spy_on_drops(cache))
        return cache

    monkeypatch.setattr(kvpolicy, "make_cache", make_cache)
    run = Run(model, case, **settings)
    monkeypatch.undo()
    log = logs[0]
    assert log, "the prompt's forward freed nothing: the prompts are longer than the window"
    assert_bound(run.cache, model, slack=False)
    other = twin(model, case, **settings) if case in PROMPT_ONLY else None
    prompt_drops = len(log)
    token = run.next_token
    for step in range(1, STEPS + 1):
        got, _ = check_step(run, token, f"{name} {case} {path} step {step}")
        assert_bound(run.cache, model, slack=True)
        if other is not None:
            want = other.step(token)
            assert (got - want).abs().max().item() <= TOL, f"step {step}: the drop changed the logits"
        token = got.argmax(-1)
    assert len(log) > prompt_drops, "decoding freed nothing"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_generates_what_transformers_own_cache_does_and_holds_no_more(name):
    """``generate`` with ``full``, eager and on the frozen path, left-padded: transformers' tokens (its cache drops
    what leaves the window too), and at the end no more tokens per layer than it holds but the group slack."""
    model = MODELS[name]()
    inputs = oracle.batch(oracle.LENGTHS, seed=5)
    settings = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = DynamicCache(config=model.config)
        expected = model.generate(**inputs, past_key_values=reference, **settings)
        for compiled in (False, True):
            cache = kvpolicy.PolicyCache("full", compiled_decode=compiled)
            assert torch.equal(model.generate(**inputs, past_key_values=cache, **settings), expected)
            theirs = [layer.keys.shape[2] for layer in reference.layers]
            windows = sliding_windows(model.config)
            for ours, n, window in zip(cache.kv_tokens_per_layer(), theirs, windows):
                assert ours <= n + (0 if window is None else dead_group(window) - 1), (cache.kv_tokens_per_layer(),
                                                                                        theirs)


@pytest.mark.parametrize("case", ["full", "snapkv", "h2o", "pyramidinfer", "streamingllm"])
def test_the_frozen_path_frees_between_steps_in_buffers_sized_to_the_window(case):
    """The compiled decode path (its frozen layers, stepped eagerly here) keeps exactly the eager path's tokens and
    positions, and a sliding layer's buffer holds ``window + dead_group - 1`` slots at most: it is never re-sized."""
    model = MODELS["gemma3-w24"]()
    policy, overrides, _ = oracle.CASES[case]
    inputs = oracle.batch(oracle.LENGTHS, seed=6)
    settings = dict(max_new_tokens=3 * STEPS, do_sample=False, pad_token_id=0, eos_token_id=None)
    eager, frozen = (kvpolicy.make_cache(policy, compiled_decode=c, **overrides) for c in (False, True))
    capacities = []
    real_begin = frozen.begin_step

    def begin_step():
        real_begin()
        capacities.append([layer.capacity for layer in frozen.layers])

    frozen.begin_step = begin_step
    with torch.no_grad():
        a = model.generate(**inputs, past_key_values=eager, **settings)
        b = model.generate(**inputs, past_key_values=frozen, **settings)
    assert torch.equal(a, b)
    assert frozen.is_frozen() and capacities
    for idx, window in enumerate(sliding_windows(model.config)):
        assert torch.equal(eager.kept_positions(idx), frozen.kept_positions(idx)[..., : eager.layers[idx].length])
        if window is not None:
            sizes = {step[idx] for step in capacities}
            assert len(sizes) == 1 and max(sizes) <= window + dead_group(window) - 1, sizes


@pytest.mark.parametrize("case", ["full", "snapkv", "kvzip"])
def test_a_copy_continued_by_a_second_turn(case):
    """Compress once, ask twice: the context's cache copied, each copy continued with another question (a forward of
    several tokens over the freed layers: they see every in-window key, then free what left the window).
    ``full`` answers as transformers' cache over context and question; every policy as itself with the drop off;
    the context's cache is left as it was."""
    model = MODELS["gemma3"]()
    policy, overrides, _ = oracle.CASES[case]
    context = oracle.batch([40, 29], seed=7)
    questions = [torch.randint(3, 97, (2, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)

    def filled(frees: bool):
        cache = kvpolicy.make_cache(policy, compiled_decode=False, **overrides)
        cache.compressor.frees_out_of_window = frees
        with torch.no_grad():
            kvpolicy.prefill(model, context["input_ids"], context["attention_mask"], cache)
        return cache

    cache, keeps = filled(True), filled(False)
    before = [layer.pos_view().clone() for layer in cache.layers]
    assert_bound(cache, model, slack=False)
    for question in questions:
        ids = torch.cat([context["input_ids"], question], 1)
        mask = torch.cat([context["attention_mask"], torch.ones_like(question)], 1)
        with torch.no_grad():
            copy = cache.copy()
            got = model.generate(input_ids=ids, attention_mask=mask, past_key_values=copy, **settings)
            want = model.generate(input_ids=ids, attention_mask=mask, past_key_values=keeps.copy(), **settings)
            assert torch.equal(got, want), "the drop changed the answer"
            if case == "full":
                theirs = model.generate(input_ids=ids, attention_mask=mask,
                                        past_key_values=DynamicCache(config=model.config), **settings)
                assert torch.equal(got, theirs)
        assert_bound(copy, model, slack=True)
    assert all(torch.equal(a, layer.pos_view()) for a, layer in zip(before, cache.layers))


@functools.cache
def _lookup_prompt() -> torch.Tensor:
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    return torch.cat([ids, ids[:, :10], ids[:, 3:12]], 1)  # repeats, so prompt lookup drafts and some drafts fail


def test_assisted_decoding_crops_a_freed_full_cache():
    """Prompt-lookup decoding drafts tokens, verifies them in one forward and crops the rejected ones: transformers
    asks the cache to record its past first, so a sliding layer keeps what left the window until the crop, then
    frees it (as transformers' sliding layers do). ``full`` gives transformers' tokens."""
    model = MODELS["gemma3"]()
    settings = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    cache = kvpolicy.PolicyCache("full")
    with torch.no_grad():
        expected = model.generate(input_ids=_lookup_prompt(), past_key_values=DynamicCache(config=model.config),
                                  **settings)
        got = model.generate(input_ids=_lookup_prompt(), past_key_values=cache, **settings)
    assert torch.equal(got, expected)
    assert_bound(cache, model, slack=False)


def test_crop_refuses_when_the_tokens_its_next_query_sees_were_freed():
    """Without ``activate_past_recording`` a decode step frees what left the window; cropping past that step would
    leave the next query without keys it must see: refused, naming assisted decoding's way."""
    model = MODELS["gemma3"]()
    cache = kvpolicy.PolicyCache("full", compiled_decode=False)
    with torch.no_grad():
        model.generate(**oracle.batch([30], seed=8), past_key_values=cache, max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    with pytest.raises(CacheMisuseError, match="activate_past_recording"):
        cache.crop(-2)
    cache.crop(0)  # nothing removed: allowed


def test_kv_accounting_counts_only_what_is_held():
    """``memory_bytes`` and ``kv_tokens_per_layer`` of ``full`` after the prompt: a sliding layer's bytes are its
    ``window - 1`` tokens', a global layer's the prompt's; the cache with the drop off holds the whole prompt. The
    buffers are re-sized too (as by any compaction that would leave more than twice the headroom unused: the
    prompt is longer than the window by more than that)."""
    model = MODELS["gemma3"]()
    n = 200
    ids = torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(9))
    caches = []
    for frees in (True, False):
        cache = kvpolicy.PolicyCache("full", compiled_decode=False)
        cache.compressor.frees_out_of_window = frees
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        caches.append(cache)
    ours, keeps = caches
    windows = sliding_windows(model.config)
    assert ours.kv_tokens_per_layer() == [n if w is None else w - 1 for w in windows]
    assert keeps.kv_tokens_per_layer() == [n] * len(windows)
    per_token = [b // n for b in keeps.memory_bytes_per_layer(allocated=False)]
    assert ours.memory_bytes_per_layer(allocated=False) == [n * t for n, t in zip(ours.kv_tokens_per_layer(),
                                                                                   per_token)]
    for idx, window in enumerate(windows):
        mine, theirs = ours.memory_bytes_per_layer()[idx], keeps.memory_bytes_per_layer()[idx]
        assert mine < theirs / 2 if window is not None else mine == theirs


def test_pyramidinfer_evicts_no_live_token_for_a_group_the_window_freed():
    """PyramidInfer's decode plan evicts part of each group of ``exceed_length_to_compress`` tokens after its
    recent window. With a recent window wider than the layer's sliding window the first groups have left the
    window, and the cache freed them: the plan must evict nothing else for them (counting evictions from the group
    as if it were still held would take live tokens instead)."""
    model = MODELS["mistral"]()
    case = ("pyramidinfer", dict(oracle.PYRAMID, prefill_recent_ratio=0.9), True)
    run = Run(model, case)
    window = model.config.sliding_window
    token = run.next_token
    for step in range(1, 5):
        got, _ = check_step(run, token, f"step {step}")
        token = got.argmax(-1)
        columns = run.width
        for idx, layer in enumerate(run.cache.layers):
            for b, row in enumerate(held(layer)):
                live = set(range(max(run.pad[b], columns - window + 1), columns))
                for h, kept in enumerate(row):
                    assert live <= kept, f"step {step} layer {idx} row {b} head {h}: evicted live {live - kept}"


#: the drop against no drop under 8-bit codes: float32 rounding (~2e-7 at the model's dtype) can flip one new
#: code at a half-step boundary, which moves the logits ~1e-5 (measured 2.0e-5: snapkv, int8, step 6, on the
#: CPU of 2026-12-08); two tokens' scales swapped in one layer's keys move them 1.6e-2
QUANT_TOL = 1e-3


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("case", ["full", "snapkv", "h2o"])
def test_quantized_codes_move_with_their_positions(case, kv_dtype):
    """Under an 8-bit ``kv_dtype`` the drop moves codes and scales with their positions (a code read with another
    token's scale would change the logits far beyond the tolerance): every decode step of the prompt-only plans
    equals the same cache with the drop off, and every sliding layer keeps within the bound."""
    model = MODELS["gemma3-w24"]()
    run = Run(model, case, kv_dtype=kv_dtype)
    other = twin(model, case, kv_dtype=kv_dtype) if case in PROMPT_ONLY else None
    assert_bound(run.cache, model, slack=False)
    token = run.next_token
    for step in range(1, STEPS + 1):
        got = run.step(token)
        assert_bound(run.cache, model, slack=True)
        if other is not None:
            gap = (got - other.step(token)).abs().max().item()
            assert gap <= QUANT_TOL, f"step {step}: the drop changed the logits by {gap:.2e}"
        token = got.argmax(-1)
