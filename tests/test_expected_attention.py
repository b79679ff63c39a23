"""Expected Attention: registration, budgets and protections, a generous budget equal to ``full``, the
RoPE helpers, the selection against a naive oracle, and the compiled decode path against the eager one.

The oracle shares nothing with the policy's code path: the queries before RoPE are recomputed from the
hidden states entering each attention module (a forward pre-hook, ``q_proj`` applied here, as kvpress
reads them), not un-rotated from the queries the cache recorded; RoPE's rotations come from the model's
own ``rotary_emb`` as full ``D x D`` matrices built in float64, one per future position, and averaged;
the expected logits, the softmax, the group mean and the value norms are computed in float64 with
plain loops over rows. A selection is right when each row and head keeps its budget, its sinks and
window, and no evicted token scores above a kept one (within ``SCORE_TOL``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from models import COMMON, batch, greedy, tiny_model
from test_compiled_generate import compiled_and_eager
from test_tova_knorm import assert_same_as_full, assert_top_scored, budget_checker, decode, kept_set, protected
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Phi3Config

import kvpolicy
from kvpolicy import ConfigError, make_cache, make_policy
from kvpolicy.core import registry, rope
from kvpolicy.policies import BUILTIN_POLICIES, ExpectedAttentionConfig, ExpectedAttentionPolicy

SCORE_TOL = 1e-5
LENGTHS = [40, 25, 33]  # left-padded: pads 0, 15, 7

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@functools.cache
def peaked(kv_heads: int = 2, family: str = "llama", partial: float = 1.0):
    """The tiny shape, initialised 5x wider (peaked attention, so scores differ clearly); ``partial``:
    Phi-3's ``partial_rotary_factor`` (RoPE on the first share of each head's dimensions only);
    ``family="llama-yarn"``: YaRN-scaled RoPE, whose cos/sin carry an attention factor (cos² + sin² != 1)."""
    values = dict(COMMON, num_key_value_heads=kv_heads, initializer_range=0.1)
    if family == "phi3":
        config = Phi3Config(**values)
        config.rope_parameters["partial_rotary_factor"] = partial
    elif family == "llama-yarn":
        config = LlamaConfig(**values, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                            original_max_position_embeddings=128))
    else:
        config = LlamaConfig(**values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def row_local_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


# ------------------------------------------------------------------------------- registration


def test_listed_registered_as_a_plugin_and_built_by_name():
    assert "expected_attention" in kvpolicy.available_policies()
    assert ExpectedAttentionPolicy in BUILTIN_POLICIES
    hooked = [cls for classes in registry.plugin_manager().hook.kvpolicy_policies() for cls in classes]
    assert ExpectedAttentionPolicy in hooked, "registered through the kvpolicy.policies hook"
    cache = make_cache("expected_attention", budget=9, sink_size=1, window_size=2, n_future_positions=64)
    assert isinstance(cache.policy, ExpectedAttentionPolicy)
    assert (cache.policy.config.budget, cache.policy.config.n_future_positions) == (9, 64)
    assert isinstance(make_policy(ExpectedAttentionConfig(budget=5)), ExpectedAttentionPolicy)
    assert kvpolicy.PolicyCache("expected_attention", compression_ratio=0.3).policy.config.compression_ratio == 0.3
    for bad in (dict(compression_ratio=1.0), dict(n_future_positions=0), dict(stats_window=1), dict(epsilon=-1),
                dict(compress="never"), dict(unknown=1)):
        with pytest.raises(ConfigError):
            make_cache("expected_attention", **bad)


def test_defaults_are_kvpress_s():
    c = ExpectedAttentionConfig()
    assert (c.sink_size, c.window_size, c.compress, c.n_future_positions) == (4, 0, "prefill", 512)
    assert (c.use_covariance, c.use_vnorm, c.epsilon, c.stats_window) == (True, True, 0.0, None)
    assert not ExpectedAttentionPolicy.shared_positions


# ------------------------------------------------------------------------------- RoPE helpers


@pytest.mark.parametrize("family, partial", [("llama", 1.0), ("phi3", 0.5), ("llama-yarn", 1.0)])
def test_rope_helpers_match_the_model_s_rotary_embedding(family, partial):
    """cos/sin are the model's; rotate is its apply_rotary_pos_emb; unrotate inverts it; the matrix form
    rotates alike (also for averaged cos/sin); partial rotary leaves the other dimensions alone."""
    model = peaked(2, family, partial)
    attn = model.model.layers[1].self_attn
    positions = torch.tensor([[0, 5, 17, 300], [3, 4, 9, 11]])
    cos, sin = rope.cos_sin(attn, positions)
    ref_cos, ref_sin = model.model.rotary_emb(torch.zeros(1), positions)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    d = attn.head_dim
    assert cos.shape[-1] == int(d * partial)
    x = torch.randn(2, 4, 4, d)  # [B, H, P, D]
    module = __import__(type(attn).__module__, fromlist=["apply_rotary_pos_emb"])
    expected, _ = module.apply_rotary_pos_emb(x, x, ref_cos, ref_sin)
    got = rope.rotate(x, cos.unsqueeze(1), sin.unsqueeze(1))
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(rope.unrotate(got, cos.unsqueeze(1), sin.unsqueeze(1)), x, atol=1e-5)
    matrix = rope.rotation_matrix(cos, sin, d)  # [B, P, D, D]
    assert torch.allclose((matrix.unsqueeze(1) @ x.unsqueeze(-1)).squeeze(-1), got, atol=1e-5)
    mean_c, mean_s = cos.mean(1), sin.mean(1)
    averaged = rope.rotation_matrix(mean_c, mean_s, d)  # the mean of the per-position matrices
    assert torch.allclose(averaged, matrix.mean(1), atol=1e-6)
    if partial < 1.0:
        assert torch.equal(got[..., cos.shape[-1] :], x[..., cos.shape[-1] :])
    if family == "llama-yarn":  # the scaled case really is one
        assert not torch.allclose(cos * cos + sin * sin, torch.ones_like(cos))


def test_rope_helpers_use_gemma3_s_base_per_layer_type():
    model = tiny_model("gemma3", "eager")
    positions = torch.arange(40).view(1, -1)
    seen = set()
    for layer in model.model.layers:
        attn = layer.self_attn
        cos, sin = rope.cos_sin(attn, positions)
        ref = model.model.rotary_emb(torch.zeros(1), positions, attn.layer_type)
        assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])
        seen.add(attn.layer_type)
    assert seen == {"sliding_attention", "full_attention"}


# ------------------------------------------------------------------------------- budgets (hypothesis)


@settings(max_examples=40)
@example(lengths=LENGTHS, budget=12, sinks=2, window=3, steps=8, compress="both", evict_every=1)
@example(lengths=LENGTHS, budget=10, sinks=4, window=0, steps=4, compress="prefill", evict_every=1)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3),
    budget=st.integers(1, 50),
    sinks=st.integers(0, 5),
    window=st.integers(0, 8),
    steps=st.integers(0, 6),
    compress=st.sampled_from(["both", "prefill"]),
    evict_every=st.integers(1, 3),
)
def test_budget_never_exceeded_and_protected_tokens_kept(lengths, budget, sinks, window, steps, compress,
                                                         evict_every):
    """After the prompt no row of any layer holds more than ``budget`` tokens; while decoding a prompt-only
    cache grows one token a step and a re-compressing one stays within ``evict_every - 1`` of the budget,
    never past ``decode_growth``; sinks and the recent window survive every compression."""
    model = tiny_model("llama", "sdpa")
    cache = make_cache("expected_attention", budget=budget, sink_size=sinks, window_size=window, compress=compress,
                       evict_every=evict_every, decode_stats_window=4, compiled_decode=False)
    check = budget_checker(cache, lengths, budget, sinks, window, compress, evict_every)
    decode(model, cache, batch(lengths), steps, check)


@pytest.mark.parametrize("settings", [dict(budget=60), dict(compression_ratio=0.0),
                                      dict(budget=50, compress="both", sink_size=0)],
                         ids=["budget", "ratio0", "both"])
def test_generous_budget_gives_exactly_the_full_policys_tokens(settings):
    assert_same_as_full("expected_attention", settings)


def test_padded_row_keeps_what_the_row_alone_keeps():
    model = peaked(2)
    inputs = batch([60, 41], seed=3)
    together = make_cache("expected_attention", compression_ratio=0.5, compress="both", evict_every=3)
    out_together = greedy(model, inputs, together, new_tokens=12)
    alone = make_cache("expected_attention", compression_ratio=0.5, compress="both", evict_every=3)
    out_alone = greedy(model, {k: v[1:, 60 - 41 :] for k, v in inputs.items()}, alone, new_tokens=12)
    assert torch.equal(out_together[1], out_alone[0])
    for layer in range(4):
        for head in range(2):  # the same tokens (the padded batch's layout may hold surplus slots)
            assert kept_set(together, layer, 1, head) == kept_set(alone, layer, 0, head)


# ------------------------------------------------------------------------------- the oracle


class Recorder:
    """Every attention module's input hidden states, per layer, in call order (a forward pre-hook)."""

    def __init__(self, model):
        self.hidden: dict[int, list[torch.Tensor]] = {}
        self.hooks = [layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                      for i, layer in enumerate(model.model.layers)]

    def _hook(self, idx):
        def hook(module, args, kwargs):
            self.hidden.setdefault(idx, []).append(kwargs["hidden_states"].detach().double())
        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def naive_scores(model, layer_idx: int, hidden: torch.Tensor, query_local: torch.Tensor, query_ok: torch.Tensor,
                 keys: torch.Tensor, values: torch.Tensor, key_ok: torch.Tensor, seen: list[int],
                 config: ExpectedAttentionConfig, key_local: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``[B, H_kv, L]`` from scratch. ``hidden`` ``[B, W, hidden]``: the inputs of the queries that
    make the statistics, at row-local positions ``query_local`` ``[B, W]`` (used where ``query_ok``);
    ``keys``/``values`` ``[B, H_kv, L, D]`` the candidates (valid where ``key_ok`` ``[B, H_kv, L]``), at row-local
    positions ``key_local`` ``[B, L]`` (the softmax leaves out those below ``sink_size``)."""
    attn = model.model.layers[layer_idx].self_attn
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    groups = hq // hkv
    # Phi-3 fuses the projections: its first H_q * D output rows are the queries' (no bias in either)
    weight = attn.q_proj.weight if hasattr(attn, "q_proj") else attn.qkv_proj.weight[: hq * d]
    with torch.no_grad():
        pre = torch.nn.functional.linear(hidden, weight.double())
    b, w = pre.shape[:2]
    pre = pre.view(b, w, hq, d)
    out = torch.zeros(b, hkv, keys.shape[2], dtype=torch.float64)
    for row in range(b):
        use = [j for j in range(w) if query_ok[row, j] and query_local[row, j] >= config.sink_size]
        future = torch.arange(seen[row], seen[row] + config.n_future_positions).view(1, -1)
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float64), future)
        rot = torch.zeros(d, d, dtype=torch.float64)
        for c, s in zip(cos[0].double(), sin[0].double()):  # a D x D matrix per future position
            r = len(c)  # the rotated dimensions come first; the others pass through
            half = torch.zeros(r, r, dtype=torch.float64)
            for i in range(r // 2):
                half[i, i + r // 2], half[i + r // 2, i] = -1.0, 1.0
            mat = torch.eye(d, dtype=torch.float64)
            mat[:r, :r] = torch.diag(c) + torch.diag(s) @ half
            rot += mat / config.n_future_positions
        for kv in range(hkv):
            probs = []
            for g in range(groups):
                q = pre[row, use, kv * groups + g] if use else torch.zeros(1, d, dtype=torch.float64)
                mu = q.mean(0)
                sigma = (q - mu).T @ (q - mu) / max(len(use), 1)
                mu, sigma = rot @ mu, rot @ sigma @ rot.T
                k = keys[row, kv].double()
                logits = attn.scaling * (k @ mu)
                if config.use_covariance:
                    logits = logits + 0.5 * attn.scaling**2 * torch.einsum("li,ij,lj->l", k, sigma, k)
                logits = logits.masked_fill(~key_ok[row, kv], float("-inf"))
                if key_local is not None:  # the sinks are left out of the softmax
                    logits = logits.masked_fill(key_local[row] < config.sink_size, float("-inf"))
                probs.append(torch.softmax(logits, dim=-1))
            score = torch.stack(probs).mean(0)
            if config.use_vnorm:
                score = (score + config.epsilon) * values[row, kv].double().norm(dim=-1)
            out[row, kv] = score
    return out


ORACLE_CASES = {
    "defaults-gqa": (2, "llama", 1.0, dict(compression_ratio=0.5)),
    "defaults-mha": (4, "llama", 1.0, dict(compression_ratio=0.5)),
    "no-covariance-window": (2, "llama", 1.0, dict(budget=14, use_covariance=False, window_size=3, sink_size=2)),
    "no-vnorm-future64": (2, "llama", 1.0, dict(compression_ratio=0.6, use_vnorm=False, n_future_positions=64)),
    "epsilon-stats-window": (2, "llama", 1.0, dict(budget=12, epsilon=0.05, stats_window=16, sink_size=0)),
    "phi3-partial-rotary": (2, "phi3", 0.5, dict(compression_ratio=0.5)),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_prefill_keeps_the_tokens_the_naive_expected_attention_ranks_first(case):
    kv_heads, family, partial, settings = ORACLE_CASES[case]
    model = peaked(kv_heads, family, partial)
    config = ExpectedAttentionConfig(**settings)
    inputs = batch(LENGTHS)
    mask = inputs["attention_mask"]
    positions = row_local_positions(mask)
    cache = make_cache("expected_attention", **settings)
    plain = DynamicCache(config=model.config)
    recorder = Recorder(model)
    try:
        with torch.no_grad():
            model(**inputs, position_ids=positions, past_key_values=plain)
    finally:
        recorder.remove()
    with torch.no_grad():
        model(**inputs, position_ids=positions, past_key_values=cache)
    width = max(LENGTHS)
    local = torch.where(mask == 1, positions, torch.full_like(positions, -1))  # [B, width]: row-local, -1 pads
    for layer in range(model.config.num_hidden_layers):
        hidden = recorder.hidden[layer][0]
        ok = local >= 0
        w = config.stats_window
        if w is not None:  # the newest columns only (a row's pads may be among them)
            hidden, qlocal, qok = hidden[:, -w:], local[:, -w:], ok[:, -w:]
        else:
            qlocal, qok = local, ok
        keys, values = plain.layers[layer].keys, plain.layers[layer].values
        key_ok = (local >= 0).unsqueeze(1).expand(-1, keys.shape[1], -1)
        scores = naive_scores(model, layer, hidden, qlocal, qok, keys, values, key_ok, LENGTHS, config, local)
        for row, n in enumerate(LENGTHS):
            keep = config.budget if config.budget is not None else n - int(n * config.compression_ratio)
            must = protected(n, keep, config.sink_size, config.window_size)
            for head in range(kv_heads):
                by_pos = {p: scores[row, head, width - n + p].item() for p in range(n)}
                assert_top_scored(kept_set(cache, layer, row, head), by_pos, keep, must,
                                  f"{case}: layer {layer} row {row} head {head}")
    assert any(kept_set(cache, layer, row, 0) != kept_set(cache, layer, row, 1) for layer in range(4)
               for row in range(len(LENGTHS))), "each KV head selects its own keys"


def test_decode_time_compression_uses_the_newest_queries_statistics():
    """``compress="both"``: each step's selection among the kept tokens and the new one, from the naive
    scores with the statistics of the ``decode_stats_window`` newest queries (hidden states recorded at
    every step) and the future from each row's next position."""
    model = peaked(2)
    settings = dict(budget=16, sink_size=1, window_size=2, compress="both", decode_stats_window=6,
                    n_future_positions=32)
    config = ExpectedAttentionConfig(**settings)
    cache = make_cache("expected_attention", **settings, compiled_decode=False)
    keys_seen: dict[int, list[torch.Tensor]] = {}
    update = cache.update

    def spy(key_states, value_states, layer_idx, *args, **kwargs):
        keys_seen.setdefault(layer_idx, []).append((key_states.detach().clone(), value_states.detach().clone()))
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = spy
    recorder = Recorder(model)
    width = max(LENGTHS)
    before: dict[tuple[int, int, int], set[int]] = {}
    evictions = 0

    def check(step: int):
        nonlocal evictions
        for layer in range(4):
            keys = torch.cat([k for k, _ in keys_seen[layer]], dim=2)  # [B, H, width + step, D] by column
            values = torch.cat([v for _, v in keys_seen[layer]], dim=2)
            hidden = torch.cat(recorder.hidden[layer], dim=1)  # [B, width + step, hidden]
            cols = torch.arange(width + step)
            pad = torch.tensor([width - n for n in LENGTHS]).view(-1, 1)
            local = torch.where(cols >= pad, cols - pad, torch.full_like(cols - pad, -1))  # [B, columns]
            if step == 0:
                continue  # the prefill's selection is the other test's
            window = config.decode_stats_window
            qlocal, qok = local[:, -window:], local[:, -window:] >= 0
            seen = [n + step for n in LENGTHS]
            for row in range(len(LENGTHS)):
                for head in range(2):
                    candidates = before[layer, row, head] | {seen[row] - 1}
                    cand_cols = torch.tensor(sorted(candidates)) + pad[row, 0]
                    k = keys[row : row + 1, :, cand_cols]
                    v = values[row : row + 1, :, cand_cols]
                    ok = torch.ones(1, 2, len(cand_cols), dtype=torch.bool)
                    scores = naive_scores(model, layer, hidden[row : row + 1, -window:], qlocal[row : row + 1],
                                          qok[row : row + 1], k, v, ok, [seen[row]], config,
                                          torch.tensor(sorted(candidates)).view(1, -1))
                    by_pos = {p: scores[0, head, i].item() for i, p in enumerate(sorted(candidates))}
                    keep = min(config.budget, seen[row])
                    must = protected(seen[row], keep, config.sink_size, config.window_size)
                    kept = kept_set(cache, layer, row, head)
                    assert_top_scored(kept, by_pos, keep, must, f"step {step} layer {layer} row {row} head {head}")
                    evictions += len(candidates) > len(kept)

        for layer in range(4):
            for row in range(len(LENGTHS)):
                for head in range(2):
                    before[layer, row, head] = kept_set(cache, layer, row, head)

    try:
        decode(model, cache, batch(LENGTHS), 5, check)
    finally:
        recorder.remove()
    assert evictions, "nothing was evicted while decoding"


# ------------------------------------------------------------------------------- compiled decode path

COMPILED = {
    "prefill": dict(compression_ratio=0.5),
    "both-every3": dict(compression_ratio=0.5, sink_size=2, window_size=3, compress="both", evict_every=3,
                        decode_stats_window=8),
    "both-budget": dict(budget=16, compress="both", decode_stats_window=5, use_covariance=False),
}


@pytest.mark.parametrize("case", sorted(COMPILED))
def test_compiled_generate_equals_the_eager_path(case, fresh_dynamo):
    """The compiled decode step over frozen layers (forced on the CPU, ``eager`` dynamo backend) gives the
    eager path's tokens and kept positions, in one graph (``decode_growth`` sized the buffers); the
    decode-time statistics come from the static layer's query ring."""
    settings = COMPILED[case]
    model = tiny_model("llama", "sdpa")
    cache, eager = compiled_and_eager(model, "expected_attention", settings)
    assert cache.valid_tokens_per_layer() == eager.valid_tokens_per_layer()
    for layer in range(len(cache.layers)):
        assert torch.equal(cache.kept_positions(layer), eager.kept_positions(layer))
