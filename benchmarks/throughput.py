"""Generated tokens/s and memory per policy on a Llama-2-7B-shaped model with random weights.

Speed does not depend on weight values, so the model is built from its config on the device
(nothing big travels). For each policy: fixed batch sizes (per-step overhead), and the largest
batch that fits, found from a linear memory model fitted at two batch sizes and then
confirmed by a real run (stepping down on out-of-memory).

    python benchmarks/throughput.py --shape llama2-7b --prompt-lens 512 --batch-sizes 1,8,32 \
        --json docs/benchmarks/throughput.json

``--shape tiny`` runs a CPU dry run (the test suite does this so the script cannot rot).

``--json`` writes ``{"meta": ..., "rows": [...]}``. ``meta``: ``kvpolicy.provenance.run_meta``
(argv, git commit with a dirty flag, versions, machine and threads, date) plus the keys every
file of this script has had (``command``, ``device``, ``torch``, ``transformers``, ``shape``,
``dtype``; ``kvpress`` when a press ran), which benchmarks/report_throughput.py reads. Each row:
one run of one policy at one batch; ``kv_bytes_per_seq`` is the KV memory the cache holds per
sequence at the end (its buffers' capacity), ``kv_bytes_used_per_seq`` the slots in use (older
files lack it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a run may point it at another checkout
import kvpolicy  # noqa: E402

SCRIPT = "benchmarks/throughput.py"  # argv[0] recorded when main() is called with an argument list


def run_meta(argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """``kvpolicy.provenance.run_meta`` of the kvpolicy being measured, or this checkout's when an
    older kvpolicy without it comes first on ``PYTHONPATH`` (its commit is then this checkout's);
    ``kvpolicy_path`` names the package that ran either way."""
    try:
        from kvpolicy.provenance import run_meta as meta_of
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_kvpolicy_provenance", Path(__file__).resolve().parents[1] / "kvpolicy" / "provenance.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        meta_of = module.run_meta
    return meta_of(argv, kvpolicy_path=str(Path(kvpolicy.__file__).resolve().parent), **extra)

SHAPES = {
    "llama2-7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama3-8b": dict(  # GQA: 32 query / 8 KV heads, so a quarter of Llama-2's KV per token
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=40960, rope_theta=500000.0,
    ),
    "llama2-70b": dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=97, max_position_embeddings=4096,
    ),
}

#: policy label -> how to build its cache (None: transformers' own cache implementation)
POLICIES: dict[str, Any] = {
    "hf-dynamic": lambda: DynamicCache(),
    "hf-static": None,  # generate(cache_implementation="static"): transformers compiles the step
    "full": lambda: kvpolicy.make_cache("full"),
    "pyramidinfer": lambda: kvpolicy.make_cache("pyramidinfer_llama2_7b"),
    "pyramidinfer-54": lambda: kvpolicy.make_cache("pyramidinfer_54"),
    "pyramidinfer-54-prune": lambda: kvpolicy.make_cache("pyramidinfer_54_prune"),
    "h2o": lambda: kvpolicy.make_cache("h2o", compression_ratio=0.54, evict_every=16),
    "streamingllm": lambda: kvpolicy.make_cache("streamingllm", compression_ratio=0.54, evict_every=16),
}

#: policy label -> preset decoded through kvpolicy.generation.generate_static (compiled static step)
STATIC_POLICIES: dict[str, Any] = {
    "full-static": lambda: kvpolicy.make_cache("full"),
    "pyramidinfer-static": lambda: kvpolicy.make_cache("pyramidinfer_llama2_7b"),
    "pyramidinfer-54-static": lambda: kvpolicy.make_cache("pyramidinfer_54"),
    "pyramidinfer-54-prune-static": lambda: kvpolicy.make_cache("pyramidinfer_54_prune"),
    "pyramidinfer-floor-static": lambda: kvpolicy.make_cache("pyramidinfer_54_floor"),
    "pyramidinfer-floor-prune-static":
        lambda: kvpolicy.make_cache("pyramidinfer_54_floor", prefill_mode="prune_hidden"),
    "streamingllm-static": lambda: kvpolicy.make_cache("streamingllm", compression_ratio=0.54, evict_every=16),
    "snapkv-static": lambda: kvpolicy.make_cache("snapkv", compression_ratio=0.54),
    # long generations: the whole sequence capped at 1024 slots (sinks and recent window / heavy hitters)
    "streamingllm-1024-static": lambda: kvpolicy.make_cache("streamingllm", budget=1024, evict_every=16),
    "h2o-1024-static": lambda: kvpolicy.make_cache("h2o", budget=1024, evict_every=16),
}
POLICIES.update({name: "static" for name in STATIC_POLICIES})

#: policy label -> (cache factory, sampling settings): plain ``model.generate`` with a kvpolicy cache, whose
#: decode step transformers compiles (CUDA graphs). Batches above ``--prefill-chunk`` rows are prefilled
#: with ``kvpolicy.prefill`` in chunks of that many rows, and ``generate`` continues on the filled cache.
GREEDY: dict[str, Any] = {}
TOP_P = {"do_sample": True, "top_p": 0.9}
GENERATE_POLICIES: dict[str, tuple[Any, dict]] = {
    "full-generate": (lambda: kvpolicy.make_cache("full"), GREEDY),
    "pyramidinfer-floor-generate": (lambda: kvpolicy.make_cache("pyramidinfer_54_floor"), GREEDY),
    "pyramidinfer-floor-generate-top-p": (lambda: kvpolicy.make_cache("pyramidinfer_54_floor"), TOP_P),
    "snapkv-generate": (lambda: kvpolicy.make_cache("snapkv", compression_ratio=0.54), GREEDY),
    "h2o-generate": (lambda: kvpolicy.make_cache("h2o", compression_ratio=0.54, evict_every=16), GREEDY),
    "streamingllm-generate":
        (lambda: kvpolicy.make_cache("streamingllm", compression_ratio=0.54, evict_every=16), GREEDY),
    # kv_dtype and the decode kernel (issue 25): "-int8" stores K/V as int8 codes; "-sdpa" keeps the step's
    # attention on dequantize + SDPA instead of the Triton kernel ("auto", the default, takes the kernel on CUDA)
    "full-generate-top-p": (lambda: kvpolicy.make_cache("full"), TOP_P),
    "full-generate-top-p-int8": (lambda: kvpolicy.make_cache("full", kv_dtype="int8"), TOP_P),
    "pyramidinfer-floor-generate-top-p-int8":
        (lambda: kvpolicy.make_cache("pyramidinfer_54_floor", kv_dtype="int8"), TOP_P),
    "pyramidinfer-floor-generate-top-p-sdpa":
        (lambda: kvpolicy.make_cache("pyramidinfer_54_floor", decode_kernel="sdpa"), TOP_P),
    "pyramidinfer-floor-generate-top-p-int8-sdpa":
        (lambda: kvpolicy.make_cache("pyramidinfer_54_floor", kv_dtype="int8", decode_kernel="sdpa"), TOP_P),
    # prune-hidden prefill (issue 27): the floor preset whose deeper layers compute only the kept tokens
    "pyramidinfer-floor-prune-generate-top-p": (lambda: kvpolicy.make_cache("pyramidinfer_54_floor_prune"), TOP_P),
    "pyramidinfer-floor-prune-generate-top-p-int8":
        (lambda: kvpolicy.make_cache("pyramidinfer_54_floor_prune", kv_dtype="int8"), TOP_P),
}
POLICIES.update({name: "generate" for name in GENERATE_POLICIES})

#: policy label -> NVIDIA kvpress press, used as kvpress documents it with ``generate``
#: (``with press(model): model.generate(...)``, transformers' DynamicCache, eager); the ratio is
#: ``--press-ratio``. kvpress compresses the prompt only and needs transformers < 5.3.
KVPRESS_POLICIES: dict[str, str] = {
    "kvpress-snapkv": "SnapKVPress",
    "kvpress-pyramidkv": "PyramidKVPress",
    "kvpress-streamingllm": "StreamingLLMPress",
}
POLICIES.update({name: "kvpress" for name in KVPRESS_POLICIES})


def build_model(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def kv_bytes(cache: Any, allocated: bool = True) -> int:
    """Bytes of keys and values the cache holds: its buffers' capacity (``allocated``, the memory
    it takes) or the slots in use. transformers' caches hold exactly what they use."""
    if isinstance(cache, kvpolicy.PolicyCache):
        return cache.memory_bytes(allocated=allocated)
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _FirstLogitsClock:
    """A logits processor that notes when ``generate`` has the prompt's logits (prefill done):
    prefill and decode are then timed in one call, with one synchronisation."""

    def __init__(self, device: str):
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            sync(self.device)
            self.at = time.perf_counter()
        return scores


def run_once(
    model, policy: str, batch: int, prompt: int, new: int, device: str, options: dict | None = None
) -> dict[str, Any]:
    """One timed greedy generation (compiled policies: after one untimed warm-up call).

    ``prefill_s`` is the time from the call to the prompt's logits (static path: to the frozen
    cache), measured inside the timed call; ``decode_step_ms`` is (total - prefill) / (new - 1);
    tokens/s counts every generated token over the whole call, prefill included, as a serving
    user sees it. Static policies (``*-static``) decode through ``generate_static`` (prefill in
    chunks of ``prefill_chunk`` rows, compiled step)."""
    from transformers import LogitsProcessorList

    from kvpolicy.generation import generate_static

    options = options or {}
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), device=device, generator=None)
    mask = torch.ones_like(ids)
    common = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    compile_options = options.get("compile", True)
    # hf-static over a long generation: time ``steps`` tokens on a cache sized for all ``new`` (its step
    # attends over the whole buffer whatever the position, so its cost does not change along the way)
    steps = options.get("hf_static_steps")
    projected = POLICIES[policy] is None and bool(steps) and steps < new
    hf_cache: list = []

    def generate(tokens: int, profile: dict | None = None):
        """-> (total seconds, prefill seconds, cache or None, sequences)"""
        kwargs = dict(common, max_new_tokens=tokens, min_new_tokens=tokens)
        cache = None
        if POLICIES[policy] == "static":
            sync(device)
            start = time.perf_counter()
            res = generate_static(model, ids, mask, policy=STATIC_POLICIES[policy], max_new_tokens=tokens,
                                  prefill_batch_size=options.get("prefill_chunk"), compile=compile_options,
                                  profile=profile, compile_prefill=options.get("compile_prefill", False))
            sync(device)
            return time.perf_counter() - start, res.prefill_seconds, res.cache, res.sequences
        if POLICIES[policy] == "generate":
            return generate_through_generate(model, policy, ids, mask, tokens, device, options.get("prefill_chunk"),
                                             options.get("compile_prefill", False))
        context = contextlib.nullcontext()
        if POLICIES[policy] is None and projected:
            from transformers import StaticCache

            kwargs.update(max_new_tokens=steps, min_new_tokens=steps)
            if not hf_cache:  # one cache for the warm-up and the timed call, as generate keeps its own: the
                # recorded CUDA graphs hold the first cache's buffers, so a second one would double the memory
                hf_cache.append(StaticCache(config=model.config, max_cache_len=prompt + new))
            hf_cache[0].reset()
            kwargs[kvpolicy.cache_argument(model)] = hf_cache[0]
        elif POLICIES[policy] is None:
            kwargs["cache_implementation"] = "static"
        elif POLICIES[policy] == "kvpress":
            cache = DynamicCache()
            kwargs[kvpolicy.cache_argument(model)] = cache
            context = make_press(policy, options.get("press_ratio", 0.54))(model)
        else:
            cache = POLICIES[policy]()
            kwargs[kvpolicy.cache_argument(model)] = cache
        clock = _FirstLogitsClock(device)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad(), context:
            out = model.generate(**kwargs, logits_processor=LogitsProcessorList([clock]))
        sync(device)
        return time.perf_counter() - start, clock.at - start, cache, out

    if POLICIES[policy] in (None, "static", "generate"):  # compile and record first: not throughput
        generate(new)
    else:  # a short call first: the process's first use of each kernel stays out of the timing
        generate(2)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    total_s, prefill_s, cache, out = generate(new)
    measured = steps if projected else new
    assert out.shape[1] == prompt + measured
    decode_s = max(total_s - prefill_s, 1e-9)
    step_s = decode_s / (measured - 1)
    if projected:  # the whole generation, from the measured prefill and step
        total_s = prefill_s + step_s * (new - 1)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    held = kv_bytes(cache) if cache is not None else None
    used = kv_bytes(cache, allocated=False) if cache is not None else None
    del cache, out
    extra: dict[str, Any] = {}
    if POLICIES[policy] == "static" and options.get("profile"):
        # a second, synchronised run: compiled step vs eager re-compression, per decode step
        profile: dict = {}
        generate(new, profile)
        steps = max(profile.get("steps", 0), 1)
        extra = {"profile_step_ms": 1000 * profile["step_s"] / steps,
                 "profile_maintain_ms": 1000 * profile["maintain_s"] / steps}
    return {
        "policy": policy,
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new,
        "prefill_s": prefill_s,
        "total_s": total_s,
        "decode_step_ms": 1000 * step_s,
        **({"projected_from_steps": measured} if projected else {}),
        "generated_tokens_per_s": batch * new / total_s,
        "peak_memory_bytes": peak,
        "kv_bytes_per_seq": None if held is None else held / batch,
        "kv_bytes_used_per_seq": None if used is None else used / batch,
        **({"prefill_chunk": options.get("prefill_chunk"), "compile_prefill": options.get("compile_prefill", False)}
           if POLICIES[policy] in ("static", "generate") else {}),
        **extra,
    }


def generate_through_generate(model, policy: str, ids, mask, tokens: int, device: str, chunk: int | None,
                              compile_prefill: bool = False):
    """Plain ``model.generate`` on a kvpolicy cache (its decode step compiled by transformers); over
    ``chunk`` rows, the prompt first goes through ``kvpolicy.prefill`` in chunks of rows and ``generate``
    continues from the prompt's greedy next token. -> (total s, prefill s, cache, sequences)"""
    from transformers import LogitsProcessorList

    factory, sampling = GENERATE_POLICIES[policy]
    cache = factory()
    clock = _FirstLogitsClock(device)
    kwargs = {"do_sample": False, "pad_token_id": 0, **sampling, "logits_processor": LogitsProcessorList([clock])}
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        if chunk and ids.shape[0] > chunk:
            first = kvpolicy.prefill(model, ids, mask, cache, rows=chunk, compile=compile_prefill)
            first = first.argmax(-1, keepdim=True)
            ids, mask, tokens = torch.cat([ids, first], 1), torch.cat([mask, torch.ones_like(first)], 1), tokens - 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             **{kvpolicy.cache_argument(model): cache}, **kwargs)
    sync(device)
    return time.perf_counter() - start, clock.at - start, cache, out


def make_press(policy: str, ratio: float) -> Any:
    try:
        import kvpress
    except ImportError as err:
        raise SystemExit(f"{policy} needs kvpress (pip install kvpress; it needs transformers<5.3): {err}") from err
    return getattr(kvpress, KVPRESS_POLICIES[policy])(compression_ratio=ratio)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def try_run(model, policy, batch, prompt, new, device, options=None):
    try:
        return run_once(model, policy, batch, prompt, new, device, options)
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        return None
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


BASE_MEMORY = [0]  # bytes allocated once the model is built
SEARCH_UP = [3]  # at most this many 10% steps up after a fitting guess


def largest_batch(model, policy, prompt, new, device, probes: list[dict], limit: int, options=None,
                  on_step=None) -> dict | None:
    """Fit peak = a + b * batch on the probes, predict the largest batch, then confirm by running:
    step down 10% on out-of-memory, or up 10% (``--search-up`` times) while it still fits."""
    pts = [(r["batch"], r["peak_memory_bytes"]) for r in probes if r and r["peak_memory_bytes"]]
    if not pts:
        return None
    if len(pts) == 1:  # one probe: the line goes through the memory held before any run (the weights)
        pts.insert(0, (0, BASE_MEMORY[0]))
    (b1, m1), (b2, m2) = pts[-2], pts[-1]
    per_seq = (m2 - m1) / (b2 - b1)
    capacity = torch.cuda.get_device_properties(0).total_memory * 0.97
    guess = min(limit, int((capacity - (m1 - per_seq * b1)) / per_seq))
    best = None
    tries_up = 0
    failed_above = False
    while b2 < guess <= limit:
        result = try_run(model, policy, guess, prompt, new, device, options)
        if result is None:
            if on_step is not None:  # recorded too: a reader can see where the search was bracketed
                on_step({"policy": policy, "batch": guess, "prompt": prompt, "oom": True,
                         "search": "out of memory (search step)"})
            if best is not None:
                failed_above = True
                break
            guess = int(guess * 0.9)
            continue
        best = result
        if on_step is not None:
            on_step(dict(result, search="fits (search step)"))
        if tries_up == SEARCH_UP[0]:
            break
        tries_up += 1
        guess = int(guess * 1.1) + 1
    if best is not None:
        best["search"] = "largest fitting found (memory-fit prediction, confirmed by running)" + (
            "" if failed_above else "; no larger batch was tried (step-up budget or limit reached)")
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--policies", default=",".join(p for p, kind in POLICIES.items() if kind != "kvpress"))
    ap.add_argument("--prompt-lens", default="512")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--batch-for", action="append", default=[], metavar="POLICY=B1,B2",
                    help="this policy's batch sizes instead of --batch-sizes (repeatable), so rows at each one's "
                         "own batch share one process and one model")
    ap.add_argument("--max-batch", action="store_true", help="also search the largest fitting batch (CUDA)")
    ap.add_argument("--max-batch-policies", default=None, help="search the largest batch only for these (default: all)")
    ap.add_argument("--batch-limit", type=int, default=512)
    ap.add_argument("--prefill-chunk", type=int, default=32, help="rows per prefill forward (static policies)")
    ap.add_argument("--profile-batch", type=int, default=32,
                    help="at this fixed batch, static policies also time the compiled step vs the eager re-compression")
    ap.add_argument("--no-compile", action="store_true", help="static policies: run the static step eagerly")
    ap.add_argument("--hf-static-steps", type=int, default=None,
                    help="hf-static: generate only this many tokens on a static cache sized for --new-tokens and "
                         "project the whole generation from the measured prefill and step (a long generation "
                         "that would not fit the time limit); the row says projected_from_steps")
    ap.add_argument("--compile-prefill", action="store_true",
                    help="kvpolicy's chunked prefill runs its cache-free parts compiled (prefill(compile=True))")
    ap.add_argument("--search-up", type=int, default=3, help="max 10%% steps up in the largest-batch search")
    ap.add_argument("--press-ratio", type=float, default=0.54, help="compression ratio of the kvpress-* policies")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    SEARCH_UP[0] = args.search_up
    dtype = getattr(torch, args.dtype)
    policies = args.policies.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        print(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    batches_for: dict[str, str] = {}
    for item in args.batch_for:
        name, sep, sizes = item.partition("=")
        if not sep or name not in POLICIES or not all(b.strip().isdigit() for b in sizes.split(",")):
            print(f"--batch-for {item!r}: write POLICY=B1,B2 with POLICY a known policy ({', '.join(POLICIES)})",
                  file=sys.stderr)
            return 2
        batches_for[name] = sizes
    model = build_model(args.shape, args.device, dtype)
    if args.device.startswith("cuda"):
        BASE_MEMORY[0] = torch.cuda.memory_allocated()
    rows: list[dict[str, Any]] = []
    # run_meta's block (argv, commit and dirty flag, versions, machine and threads, date) with this
    # script's own keys on top, under the names report_throughput.py reads from older files too
    full_argv = sys.argv if argv is None else [SCRIPT, *argv]
    meta = run_meta(
        full_argv,
        device=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        shape=args.shape,
        dtype=args.dtype,
    )
    if any(POLICIES[p] == "kvpress" for p in policies):
        from importlib.metadata import PackageNotFoundError, version

        try:
            meta["kvpress"] = version("kvpress")
        except PackageNotFoundError:
            meta["kvpress"] = None  # make_press says how to install it when the policy runs

    def save() -> None:  # after every row: a run cut short by a time limit keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for prompt in [int(p) for p in args.prompt_lens.split(",")]:
        for policy in policies:
            probes = []
            options = {"prefill_chunk": args.prefill_chunk, "compile": not args.no_compile,
                       "compile_prefill": args.compile_prefill, "hf_static_steps": args.hf_static_steps,
                       "press_ratio": args.press_ratio}
            for batch in [int(b) for b in batches_for.get(policy, args.batch_sizes).split(",")]:
                result = try_run(model, policy, batch, prompt, args.new_tokens, args.device,
                                 dict(options, profile=batch == args.profile_batch))
                if result is None:
                    rows.append({"policy": policy, "batch": batch, "prompt": prompt, "oom": True})
                    print(f"{policy} prompt={prompt} batch={batch}: out of memory", flush=True)
                    break
                probes.append(result)
                rows.append(result)
                save()
                print(json.dumps(result), flush=True)
            search = args.max_batch_policies is None or policy in args.max_batch_policies.split(",")
            if args.max_batch and search and args.device.startswith("cuda"):
                # every search step is kept (fits or out of memory), even if the run is cut short
                def on_step(row: dict) -> None:
                    rows.append(row)
                    save()
                    print(json.dumps(row), flush=True)

                best = largest_batch(model, policy, prompt, args.new_tokens, args.device, probes, args.batch_limit,
                                     options, on_step)
                if best is not None:
                    rows.append(best)
                    save()
                    print(json.dumps(best), flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
