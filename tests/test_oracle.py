"""An independent oracle for decoding over a compressed cache (issue 14).

The other decode tests compare kvpolicy with itself (padded vs alone, static vs eager), so a mask
or position bug shared by both paths passes them. Here the next-token logits of a ``PolicyCache``
are compared with a route that shares none of kvpolicy's decode code:

* **the cache is transformers' own ``DynamicCache``**, filled layer by layer (``update``) with the
  keys/values of exactly the tokens the policy kept;
* **those keys/values do not come from kvpolicy's buffers**: a spy on ``cache.update`` records,
  per layer, every key/value the model handed the cache, by absolute column (the prompt's columns,
  then one per decode step). The oracle gathers them at the kept positions the cache reports.
  That kvpolicy's own buffers hold the same tensors at those slots is asserted separately
  (bit-exact), so a gather that moves keys without their positions (or the reverse) fails twice;
* **the mask is built here** from the kept positions and the pads known from the prompt lengths
  (not from the cache's ``pad``): a row/head sees its valid kept slots and the new token, nothing
  else. Kept positions must be unique, sorted, in the past, and every row's newest token kept;
* the new token gets its true ``position_ids`` (row-local: the real tokens its row has seen), as
  ``generate`` would give it; keys are cached after RoPE, so nothing else is positional.

How the mask reaches attention, checked in transformers 5.24 (and by
``test_the_oracle_route_applies_per_layer_per_head_masks_as_given``):
``masking_utils._preprocess_mask_arguments`` returns any 4-D ``attention_mask`` as is (no
conversion, no slicing). ``eager_attention_forward`` *adds* it to the logits, so eager needs an
additive float mask (0 / ``finfo.min``; a bool mask would silently add 0/1). ``sdpa_attention_forward``
hands it to ``F.scaled_dot_product_attention``, where a bool mask means True = attend; for one query
token with GQA it first reshapes query and mask alike with ``pack_gqa`` (``[B, H_q, 1, L]`` ->
``[B, H_kv, groups, L]``), so a per-query-head mask ``[B, H_q, 1, L+1]`` stays aligned with its
heads. So per-KV-head policies (h2o, snapkv, pyramidkv, random, pyramidinfer with
``head_aggregation='kv_head'``) go through the model's own forward: the oracle's mask has a head
dimension, each query head of a GQA group getting its KV head's row (``repeat_interleave``, the
``repeat_kv`` order), and the keys/values are gathered per KV head from that head's positions.
(kvpolicy keeps the same number of tokens in every head of a row, packed first, so in
full-attention layers the mask rows of a row's heads coincide and per-head positions matter through
the keys/values; with a sliding window the rows differ per head too.) What does not work is one mask
for the whole model: layers keep different numbers of tokens and neither attention function slices
the mask to the key length, so each decoder layer gets its own mask through a forward pre-hook on
that layer that replaces its ``attention_mask`` keyword (the model's forward is given layer 0's
mask, which also makes it skip building its own).

Teeth: the oracle's logits must differ from a full ``DynamicCache``'s by more than ``TEETH``
(100x the tolerance), so the compression being checked really changes the answer. Besides the
logits, the new token's keys/values at every layer (the input of each layer's attention) must
match between the two routes, which pins a mismatch to the first layer that goes wrong.

Tolerance: ``TOL = 1e-5`` absolute on float32 logits (a few units in size here) and keys/values; the
two routes in fact agree bit for bit on this machine, since they do the same arithmetic.

Beyond the Llama matrix (every case in CASES x GQA/MHA x eager/SDPA, after the prefill and over
DECODE_STEPS decode steps with decode-time re-compression): a row without padding that holds masked
slots; sliding-window layers (Mistral, Gemma 3), where the query position matters to the mask in both
directions; and the prefill selection of H2O and SnapKV against the model's own attention weights,
the one place here where a wrong query position in the *scoring* shows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from models import COMMON, batch
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, LlamaConfig, MistralConfig

import kvpolicy
from kvpolicy.core import attention_hook
from kvpolicy.core.scoring_pass import Stage

TOL = 1e-5  # absolute, float32: logits and per-layer keys/values of the new token
TEETH = 100 * TOL  # the oracle must be this far from a full cache, or the check proves nothing
SCORE_TOL = 1e-5  # attention scores (sums of float32 probabilities) computed two ways
LENGTHS = [48, 31, 40]  # left-padded: pads 0, 17, 8
DECODE_STEPS = 8
SLIDING = 12  # the sliding-window model's window: shorter than what the policies keep

PYRAMID = dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4, gen_recent_ratio=0.1,
               exceed_length_to_compress=4, gen_query_window=8)
BUDGET = dict(compression_ratio=0.5, window_size=8, sink_size=2)

#: case -> (policy, settings that compress at ~40 tokens, re-compresses while decoding)
CASES = {
    "full": ("full", {}, False),
    "pyramidinfer": ("pyramidinfer", PYRAMID, True),
    "pyramidinfer-kv_head": ("pyramidinfer", dict(PYRAMID, head_aggregation="kv_head", pool_kernel=3), True),
    "h2o": ("h2o", BUDGET, True),
    "streamingllm": ("streamingllm", dict(BUDGET, evict_every=3), True),
    "snapkv": ("snapkv", dict(BUDGET, kernel_size=3), False),
    "snapkv-both": ("snapkv", dict(BUDGET, kernel_size=3, compress="both", evict_every=2), True),
    "pyramidkv": ("pyramidkv", dict(BUDGET, kernel_size=3), False),
    "random": ("random", dict(BUDGET, evict_every=2), True),
    "tova": ("tova", BUDGET, True),
    "knorm": ("knorm", BUDGET, False),
    "knorm-both": ("knorm", dict(BUDGET, compress="both", evict_every=2), True),
    "expected_attention": ("expected_attention", BUDGET, False),
    "expected_attention-both": ("expected_attention", dict(BUDGET, compress="both", evict_every=2,
                                                           decode_stats_window=8), True),
    "kvzip": ("kvzip", dict(BUDGET, chunk_size=16), False),
    "snapkv-adaptive": ("snapkv", dict(BUDGET, kernel_size=3, head_budget="adaptive"), False),
    "pyramidinfer-adaptive": ("pyramidinfer", dict(PYRAMID, head_aggregation="kv_head", head_budget="adaptive"),
                              True),
}
#: policies whose plan protects ``sink_size`` first and ``window_size`` newest tokens (BudgetPolicy)
BUDGETED = {"h2o", "streamingllm", "snapkv", "pyramidkv", "random", "tova", "knorm", "expected_attention", "kvzip"}
#: for test_an_unpadded_row_holding_masked_slots_matches_the_oracle only
GROUPS8 = ("pyramidinfer", dict(PYRAMID, exceed_length_to_compress=8), True)

MODELS = pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
ATTN = pytest.mark.parametrize("attn", ["eager", "sdpa"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@functools.cache
def llama(kv_heads: int, attn: str):
    """tests/models.py's tiny Llama (4 layers, 4 query heads) with ``kv_heads`` KV heads; the same
    weights for every attention implementation. Initialised 5x wider than the default so that
    attention is peaked enough for H2O's heads to pick different heavy hitters."""
    config = LlamaConfig(**dict(COMMON, num_key_value_heads=kv_heads, initializer_range=0.1))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


@functools.cache
def mistral(attn: str):
    """The same tiny shape (GQA) with every layer a sliding-window layer of SLIDING tokens."""
    config = MistralConfig(**dict(COMMON, initializer_range=0.1), sliding_window=SLIDING)
    # transformers 5.24's Mistral has no layer_types: a set sliding_window makes every layer sliding
    # (create_sliding_window_causal_mask for the whole model), enforced by the mask alone for eager/SDPA
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


@functools.cache
def gemma3(attn: str):
    """Gemma 3's mix: sliding-window layers (window SLIDING; layer 0 is one) and full-attention layers."""
    config = Gemma3TextConfig(**dict(COMMON, initializer_range=0.1), head_dim=16, sliding_window=SLIDING,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def sliding_windows(config) -> list[int | None]:
    """Each layer's window as transformers applies it (none: full attention)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    return [window if types is None or types[i] == "sliding_attention" else None
            for i in range(config.num_hidden_layers)]


@dataclass
class Kept:
    """One layer of a snapshot: what the oracle's DynamicCache holds, and who may see it."""

    keys: torch.Tensor  # [B, H_kv, L, D], from the recorded history (zeros in invalid slots)
    values: torch.Tensor
    local: torch.Tensor  # [B, H_kv, L] row-local position of each slot, -1: invalid


class Run:
    """A left-padded batch decoded by hand through a ``PolicyCache``, with every key/value the
    model gave the cache recorded by absolute column."""

    def __init__(self, model, case: str | tuple, lengths=LENGTHS, seed: int = 0, frees_out_of_window: bool = True,
                 **cache_settings):
        """``frees_out_of_window=False``: the cache keeps what leaves a sliding window (its own drop off), so that
        every kept token beyond the window stays for the mask to hide."""
        policy, settings, _ = CASES[case] if isinstance(case, str) else case
        self.model, self.lengths, self.policy, self.settings = model, list(lengths), policy, settings
        self.cache = kvpolicy.make_cache(policy, **settings, **cache_settings)
        self.cache.compressor.frees_out_of_window = self.frees = frees_out_of_window
        self.arg = kvpolicy.cache_argument(model)
        inputs = batch(self.lengths, seed=seed)
        self.ids, self.mask = inputs["input_ids"], inputs["attention_mask"]
        self.pad = [self.ids.shape[1] - n for n in self.lengths]  # known from the prompt, not the cache
        self.seen = list(self.lengths)  # real tokens each row has given the cache
        self.fed: list[torch.Tensor] = []  # tokens fed after the prompt
        self.history: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        update = self.cache.update

        def spy(key_states, value_states, layer_idx, *args, **kwargs):
            # cloned: the cache adopts its first tensors as buffers and later compacts them in place; a scoring
            # pass's tokens (KVzip) are dropped again, so they are not the prompt's
            if self.cache._scoring.stage is not Stage.CHUNKS:
                self.history.setdefault(layer_idx, []).append(
                    (key_states.detach().clone(), value_states.detach().clone()))
            return update(key_states, value_states, layer_idx, *args, **kwargs)

        self.cache.update = spy
        position_ids = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)  # as generate() does
        with torch.no_grad():
            out = model(input_ids=self.ids, attention_mask=self.mask, position_ids=position_ids,
                        **{self.arg: self.cache}, use_cache=True)
        self.next_token = out.logits[:, -1].argmax(-1)

    @property
    def width(self) -> int:
        """Columns the cache has been given (pads included)."""
        return self.ids.shape[1] + len(self.fed)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decode step through the PolicyCache; returns the next-token logits ``[B, V]``."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        position_ids = torch.tensor(self.seen).view(-1, 1)
        with torch.no_grad():
            out = self.model(input_ids=token.view(-1, 1), attention_mask=self.mask, position_ids=position_ids,
                             **{self.arg: self.cache}, use_cache=True)
        self.fed.append(token)
        self.seen = [n + 1 for n in self.seen]
        return out.logits[:, -1]

    def valid_positions(self) -> list[list[list[list[int]]]]:
        """Row-local kept positions per layer, row and head (from the absolute ``pos`` and our pads)."""
        pad = torch.tensor(self.pad).view(-1, 1, 1)
        out = []
        for layer in self.cache.layers:
            pos = layer.pos_view()
            out.append([[(pos[b, h][pos[b, h] >= pad[b, 0, 0]] - self.pad[b]).tolist() for h in range(pos.shape[1])]
                        for b in range(pos.shape[0])])
        return out

    def snapshot(self) -> list[Kept]:
        """The kept state of every layer, checked for consistency, with keys/values from the history."""
        pad = torch.tensor(self.pad).view(-1, 1, 1)
        reported = self.cache.valid_tokens_per_layer()
        layers = []
        windows = sliding_windows(self.model.config)
        for idx, layer in enumerate(self.cache.layers):
            hist_k = torch.cat([k for k, _ in self.history[idx]], dim=2)  # [B, H_kv, width, D]
            hist_v = torch.cat([v for _, v in self.history[idx]], dim=2)
            assert hist_k.shape[2] == self.width
            pos = layer.pos_view().clone()
            valid = pos >= pad
            local = torch.where(valid, pos - pad, torch.full_like(pos, -1))
            assert torch.equal(self.cache.kept_positions(idx), local), f"layer {idx}: kept_positions disagrees"
            assert bool((pos < self.width).all()), f"layer {idx}: a slot claims a token not yet seen"
            for b in range(pos.shape[0]):
                for h in range(pos.shape[1]):
                    kept = local[b, h][valid[b, h]]
                    assert bool((kept[1:] > kept[:-1]).all()), (
                        f"layer {idx} row {b} head {h}: positions {kept.tolist()}"
                    )
                    # the fullest head's count is the row's; heads keep equal counts unless head-adaptive (or,
                    # where a sliding layer freed what left its window, per-head positions leave more in one head)
                    counts = valid[b].sum(-1)
                    assert int(counts.max()) == reported[idx][b], f"layer {idx} row {b}: {counts.tolist()} valid slots"
                    uneven = self.policy == "kvzip" or self.settings.get("head_budget") == "adaptive"
                    if not (uneven or self.frees and windows[idx] is not None):
                        assert len(kept) == reported[idx][b], f"layer {idx} row {b} head {h}: {len(kept)} valid slots"
                    assert int(kept[-1]) == self.seen[b] - 1, f"layer {idx} row {b} head {h}: newest token evicted"
                    if self.policy in BUDGETED:  # sinks and the recent window survive every compression
                        recent = min(self.settings["window_size"], len(kept))
                        sinks = min(self.settings["sink_size"], len(kept) - recent)
                        must = set(range(sinks)) | set(range(self.seen[b] - recent, self.seen[b]))
                        if self.frees and windows[idx] is not None:  # what left the window may be gone
                            must = {p for p in must if p > self.seen[b] - windows[idx]}
                        assert must <= set(kept.tolist()), (
                            f"layer {idx} row {b} head {h}: lost {must - set(kept.tolist())}"
                        )
            index = pos.clamp(min=0).unsqueeze(-1).expand(*pos.shape, hist_k.shape[-1])
            zero = torch.zeros((), dtype=hist_k.dtype)
            keys = torch.where(valid.unsqueeze(-1), hist_k.gather(2, index), zero)
            values = torch.where(valid.unsqueeze(-1), hist_v.gather(2, index), zero)
            # kvpolicy's own buffers hold, bit for bit, the keys/values of the positions they claim
            assert torch.equal(layer.keys_view()[valid], keys[valid]), (
                f"layer {idx}: kept keys are not their positions'"
            )
            assert torch.equal(layer.values_view()[valid], values[valid]), (
                f"layer {idx}: kept values are not their positions'"
            )
            layers.append(Kept(keys, values, local))
        return layers


def _replace_mask(mask: torch.Tensor):
    def hook(module, args, kwargs):
        assert "attention_mask" in kwargs, "the decoder layer no longer takes attention_mask by keyword"
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


def oracle_allowed(model, kept: list[Kept], positions: list[int]) -> list[torch.Tensor]:
    """Per layer, ``[B, H_kv, L + 1]``: which kept slots (and, last, the new token) each row and KV head
    may see: the valid ones, and for a sliding-window model those within the window of the new token
    (row-local positions: pads shift query and key alike)."""
    new = torch.tensor(positions).view(-1, 1, 1)
    out = []
    for layer, window in zip(kept, sliding_windows(model.config)):
        allowed = layer.local >= 0
        if window is not None:
            allowed &= layer.local > new - window
        out.append(torch.cat([allowed, torch.ones_like(allowed[..., :1])], dim=-1))
    return out


def oracle_step(model, kept: list[Kept], token: torch.Tensor, positions: list[int], allowed=None,
                output_attentions=False):
    """The next-token forward over a plain DynamicCache holding exactly ``kept``, each layer given its
    own 4-D mask ``[B, H_q, 1, L + 1]`` from ``allowed`` (default :func:`oracle_allowed`).
    Returns ``(output, cache, masks)``."""
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    eager = model.config._attn_implementation == "eager"
    if allowed is None:
        allowed = oracle_allowed(model, kept, positions)
    cache = DynamicCache()  # no config: plain layers that keep every slot, also for a sliding-window model
    masks = []
    for idx, (layer, visible) in enumerate(zip(kept, allowed)):
        cache.update(layer.keys.clone(), layer.values.clone(), idx)
        # query head j reads KV head j // groups (repeat_kv)
        mask = visible.repeat_interleave(groups, dim=1).unsqueeze(2)
        if eager:  # eager_attention_forward adds the mask to the logits
            mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        masks.append(mask)
    assert attention_hook.PENDING.get() is None  # no kvpolicy note can reach this forward's attention
    hooks = [block.register_forward_pre_hook(_replace_mask(mask), with_kwargs=True)
             for block, mask in zip(model.model.layers, masks)]
    try:
        with torch.no_grad():
            out = model(input_ids=token.view(-1, 1), attention_mask=masks[0],
                        position_ids=torch.tensor(positions).view(-1, 1), **{kvpolicy.cache_argument(model): cache},
                        use_cache=True, output_attentions=output_attentions)
    finally:
        for hook in hooks:
            hook.remove()
    return out, cache, masks


def full_cache_logits(run: Run) -> torch.Tensor:
    """The logits of ``run``'s last step with nothing evicted: prompt and fed tokens in one forward."""
    ids = torch.cat([run.ids, *[t.view(-1, 1) for t in run.fed]], dim=1)
    mask = run.mask
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = run.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                        **{run.arg: DynamicCache()}, use_cache=True)
    return out.logits[:, -1]


def check_step(run: Run, token: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Snapshot, oracle, then the PolicyCache's own step; they must agree within TOL."""
    kept = run.snapshot()
    positions = list(run.seen)
    out, oracle_cache, _ = oracle_step(run.model, kept, token, positions)
    expected = out.logits[:, -1]
    got = run.step(token)
    for idx in range(len(kept)):  # the new token's keys/values: every layer's input agreed
        new_k, new_v = run.history[idx][-1]
        err = max((oracle_cache.layers[idx].keys[:, :, -1:] - new_k).abs().max().item(),
                  (oracle_cache.layers[idx].values[:, :, -1:] - new_v).abs().max().item())
        assert err <= TOL, f"{where}: layer {idx} new-token keys/values differ from the oracle's by {err:.3g}"
    err = (got - expected).abs().max().item()
    assert err <= TOL, f"{where}: logits differ from the oracle's by {err:.3g} (tolerance {TOL})"
    return got, expected


def assert_compressed(run: Run) -> None:
    seen = run.seen
    for b, n in enumerate(seen):
        counts = [layer[b] for layer in run.cache.valid_tokens_per_layer()]
        assert min(counts) < n, f"row {b} kept all {n} tokens in every layer: nothing was compressed ({counts})"


def evicted_during(before: list, after: list, seen_before: list[int]) -> bool:
    """True if some layer/row/head holds other than ``before`` plus the newest token."""
    for lb, la in zip(before, after):
        for b, (rb, ra) in enumerate(zip(lb, la)):
            if any(hb + [seen_before[b]] != ha for hb, ha in zip(rb, ra)):
                return True
    return False


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", sorted(set(CASES) | set(kvpolicy.available_policies())))
@MODELS
@ATTN
def test_first_decode_step_after_prefill_compression_matches_the_oracle(case, kv_heads, attn):
    assert case in CASES, f"built-in policy {case!r} has no case here: add one that compresses at this size"
    run = Run(llama(kv_heads, attn), case)
    if case != "full":
        assert_compressed(run)
    token = run.next_token
    got, expected = check_step(run, token, f"{case} first step")
    full = full_cache_logits(run)
    if case == "full":  # nothing evicted: the oracle is the full cache
        assert (full - got).abs().max().item() <= TOL
    else:
        assert (full - expected).abs().max().item() > TEETH, "the compressed cache gives the full cache's logits"


def decode_with_oracle(run: Run, steps: int = DECODE_STEPS) -> list[int]:
    """Greedy decode ``steps`` steps, checking each against the oracle; returns the steps (1-based)
    during which some layer evicted a kept token. The first step checked over a state left by a
    decode-time eviction must also differ from the full cache (teeth)."""
    evicted_at: list[int] = []
    token = run.next_token
    for step in range(1, steps + 1):
        before, seen_before = run.valid_positions(), list(run.seen)
        after_eviction = bool(evicted_at)
        got, expected = check_step(run, token, f"decode step {step}" + (" (after a re-compression)" * after_eviction))
        if after_eviction and evicted_at[-1] == step - 1:
            assert (full_cache_logits(run) - expected).abs().max().item() > TEETH, f"step {step}: no teeth"
        if run.policy == "full":  # nothing evicted: the oracle is the full cache
            assert (full_cache_logits(run) - got).abs().max().item() <= TOL, f"step {step}: full differs"
        if evicted_during(before, run.valid_positions(), seen_before):
            evicted_at.append(step)
        token = got.argmax(-1)
    return evicted_at


@pytest.mark.parametrize("case", sorted(CASES))
@MODELS
@ATTN
def test_decoding_after_decode_time_recompression_matches_the_oracle(case, kv_heads, attn):
    """The oracle holds at every one of DECODE_STEPS steps. The policies that evict while decoding
    must have re-compressed before a checked step; the others must only have grown by one a step."""
    run = Run(llama(kv_heads, attn), case)
    evicted_at = decode_with_oracle(run)
    if CASES[case][2]:
        assert [s for s in evicted_at if s < DECODE_STEPS], f"{case} never re-compressed before a checked step"
    else:
        assert not evicted_at, f"{case} evicted at decode steps {evicted_at}, though it compresses the prompt only"


@MODELS
@ATTN
def test_an_unpadded_row_holding_masked_slots_matches_the_oracle(kv_heads, attn):
    """Row 0 has no padding (pad 0), so its masked slots (-1) are told apart from real ones by
    ``pos >= 0`` alone: an off-by-one there shows only in such a row. With decode groups of 8, row 0
    evicts a group at step 3 while row 1 (42 tokens) does not, and holds fewer tokens than row 1."""
    run = Run(llama(kv_heads, attn), GROUPS8, lengths=[48, 42, 31])
    masked_row0 = []
    token = run.next_token
    for step in range(1, 6):
        if any(bool((layer.pos_view()[0] < 0).any()) for layer in run.cache.layers):
            masked_row0.append(step)
        got, _ = check_step(run, token, f"decode step {step}")
        token = got.argmax(-1)
    assert masked_row0, "row 0 never held a masked slot: the case this test is for did not arise"


@MODELS
def test_the_oracle_route_applies_per_layer_per_head_masks_as_given(kv_heads):
    """The oracle's plumbing, checked rather than assumed. kvpolicy packs each row's valid slots first
    with the same count in every head, so its decode masks only differ per head with a sliding window;
    here each KV head additionally hides a different one of its valid slots. With eager attention, the
    weights the model returns are exactly zero where a layer's mask forbids and positive where it
    allows, for every query head (transformers took each layer's 4-D mask as is); SDPA, given the same
    masks as bool, gives the same logits (it reads the per-head rows alike); and the hidden slots
    change the answer."""
    run = Run(llama(kv_heads, "eager"), "pyramidkv")  # per KV head, and a different budget per layer
    kept = run.snapshot()
    assert len({layer.local.shape[-1] for layer in kept}) > 1
    allowed = oracle_allowed(run.model, kept, run.seen)
    for visible in allowed:
        for b in range(visible.shape[0]):
            for h in range(visible.shape[1]):
                visible[b, h, visible[b, h, :-1].nonzero()[h, 0]] = False  # head h hides its h-th valid slot
    out, _, masks = oracle_step(run.model, kept, run.next_token, run.seen, allowed, output_attentions=True)
    assert len(out.attentions) == len(kept)
    for layer, mask, weights in zip(kept, masks, out.attentions):
        visible = mask == 0  # additive: 0 attends
        assert weights.shape == visible.shape == (len(LENGTHS), 4, 1, layer.local.shape[-1] + 1)
        assert bool((weights[~visible] == 0).all()) and bool((weights[visible] > 0).all())
        assert not torch.equal(visible[:, :1].expand_as(visible), visible)  # really per head
    sdpa, _, _ = oracle_step(llama(kv_heads, "sdpa"), kept, run.next_token, run.seen, allowed)
    assert (sdpa.logits - out.logits).abs().max().item() <= TOL
    plain, _, _ = oracle_step(run.model, kept, run.next_token, run.seen)
    assert (plain.logits - out.logits).abs().max().item() > TEETH


@pytest.mark.parametrize(
    "family,case",
    [("mistral", "h2o"), ("mistral", "snapkv"), ("mistral", "streamingllm"), ("mistral", "pyramidinfer-kv_head"),
     ("gemma3", "h2o"), ("gemma3", "snapkv")],
)
@ATTN
def test_sliding_window_layers_over_a_compressed_cache_match_the_oracle(family, case, attn):
    """Sliding-window layers (Mistral: all of them, window SLIDING; Gemma 3: every other one, layer 0
    included): a compressed layer's mask must also hide kept tokens that fell out of the new token's
    window, per row and, for per-head policies, per KV head; so the query's position matters in both
    directions (a token too old, the new token itself). The prompts are longer than the window: the
    cache must still read each row's padding right (it read the window's start as padding once, and
    then the full-attention layers of Gemma 3 kept nothing older than the window).

    The cache's own drop of what left the window is off here, so that every such token a policy kept
    stays for the mask to hide (with it on, the mask hides the few the cache holds between two drops:
    tests/test_sliding_drop.py)."""
    run = Run({"mistral": mistral, "gemma3": gemma3}[family](attn), case, frees_out_of_window=False)
    assert run.cache.seen_tokens() == run.seen, "the cache misread the rows' padding"
    assert_compressed(run)
    per_head = False
    token = run.next_token
    for step in range(1, 5):
        kept = run.snapshot()
        allowed = oracle_allowed(run.model, kept, run.seen)
        # the window hides some kept token, somewhere
        assert any(bool(((layer.local >= 0) & ~visible[..., :-1]).any()) for layer, visible in zip(kept, allowed))
        per_head |= any(not torch.equal(v[:, :1].expand_as(v), v) for v in allowed)
        got, _ = check_step(run, token, f"decode step {step}")
        token = got.argmax(-1)
    # (h2o's heavy hitters here lie outside the window in every head; on Gemma 3 the scores follow the window, and
    # SnapKV's budget holds every token its window queries can see, so its heads keep the same slots on sliding
    # layers: they differed there only by which out-of-window tokens they kept)
    if family == "mistral" and case in ("snapkv", "pyramidinfer-kv_head"):
        assert per_head, "the window never hid different slots in different heads"


@pytest.mark.parametrize("case", ["h2o", "snapkv"])
@MODELS
def test_prefill_selection_follows_the_models_own_attention(case, kv_heads):
    """Which tokens a scored policy keeps, from the model's own attention weights (an eager forward of
    the prompt over a plain DynamicCache, ``output_attentions``): H2O's score is the attention every
    real prompt query paid a key, SnapKV's that of the last ``window_size`` queries, max-pooled over
    ``kernel_size`` neighbours; both per KV head (its query heads averaged). Each row and head must
    keep ``n - int(n * ratio)`` tokens: its sinks and recent window, then no evicted token may score
    above a kept one (within SCORE_TOL: the two routes sum the same float32 numbers in other orders)."""
    model = llama(kv_heads, "eager")
    run = Run(model, case)
    settings, groups = CASES[case][1], model.config.num_attention_heads // kv_heads
    position_ids = (run.mask.cumsum(-1) - 1).masked_fill(run.mask == 0, 1)
    with torch.no_grad():
        out = model(input_ids=run.ids, attention_mask=run.mask, position_ids=position_ids,
                    **{run.arg: DynamicCache()}, output_attentions=True)
    width = run.ids.shape[1]
    for idx, probs in enumerate(out.attentions):  # [B, H_q, Q, K]
        real = torch.arange(width).view(1, -1) >= torch.tensor(run.pad).view(-1, 1)  # a pad query's row is junk
        probs = probs * real.view(-1, 1, width, 1)
        if case == "snapkv":
            probs = probs[:, :, -settings["window_size"]:]
        scores = probs.sum(2).view(len(LENGTHS), kv_heads, groups, width).sum(2) / groups  # [B, H_kv, K]
        if case == "snapkv":
            k = settings["kernel_size"]
            scores = torch.nn.functional.max_pool1d(scores, k, stride=1, padding=k // 2)
        kept_pos = run.cache.kept_positions(idx)
        for b, n in enumerate(LENGTHS):
            keep = n - int(n * settings["compression_ratio"])
            recent = min(settings["window_size"], keep)
            sinks = min(settings["sink_size"], keep - recent)
            protected = set(range(sinks)) | set(range(n - recent, n))
            for h in range(kv_heads):
                kept = set(kept_pos[b, h][kept_pos[b, h] >= 0].tolist())
                assert len(kept) == keep and protected <= kept, f"layer {idx} row {b} head {h}"
                row = scores[b, h, run.pad[b]:]  # by row-local position
                chosen = [row[p].item() for p in kept - protected]
                evicted = [row[p].item() for p in set(range(n)) - kept]
                assert min(chosen) >= max(evicted) - SCORE_TOL, f"layer {idx} row {b} head {h}: evicted a higher score"
