"""Prefill cost of PyramidInfer's prefill modes on a random-init Llama: cache-only against prune-hidden.

One prompt forward per variant (``kvpolicy.prefill``: the prompt's logits at its last position only),
the variants interleaved rep by rep so a load change on a shared machine hits them alike; the fastest
rep counts, and every rep is recorded. On CPU the clock is ``time.process_time`` of this process (the
wall time moves with other jobs; run with one thread: ``--threads 1``), on CUDA the synchronised wall time.
Per variant it also records the tokens each decoder layer computed (its output's length), their share of
``layers x prompt`` (what the MLP and projections cost, relative to cache-only), the KV tokens each layer
keeps, the cache's bytes and, on CUDA, the forward's peak memory.

    # CPU (the issue #27 target: prune-hidden <= 0.8x cache-only at 2048 tokens on 24 layers)
    OMP_NUM_THREADS=1 python benchmarks/prune_prefill.py --shape smollm2-24 --prompt 2048 --reps 3 \\
        --json docs/benchmarks/prune_prefill_cpu.json
    # CUDA, bf16, 8k and 32k tokens per row on the Llama-2-7B shape
    python benchmarks/prune_prefill.py --shape llama2-7b --device cuda --dtype bfloat16 --prompt 8192,32768 \\
        --rows 1 --reps 3 --json docs/benchmarks/prune_prefill_h100.json

A variant is a policy or preset name with optional JSON settings, ``name:{"key": value}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.append(str(Path(__file__).resolve().parent))
from throughput import SHAPES as THROUGHPUT_SHAPES  # noqa: E402

import kvpolicy  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402

#: SmolLM2-135M's layer shape (hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocab 49152) at 24 layers
SHAPES = {**THROUGHPUT_SHAPES, "smollm2-24": dict(
    hidden_size=576, num_hidden_layers=24, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=49152, max_position_embeddings=8192,
)}

FLOOR_PRUNE = 'pyramidinfer_54_floor:{"prefill_mode":"prune_hidden"}'
DEFAULT_VARIANTS = ",".join([
    "pyramidinfer_54_floor",
    FLOOR_PRUNE,
    "pyramidinfer_54_floor_prune",
    "pyramidinfer_54",
    "pyramidinfer_54_prune",
    "full",
])


def build_model(shape: dict, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``a,b:{"k":1},c``: split at the commas outside braces."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            item = text[start:i].strip()
            if item:
                name, _, settings = item.partition(":")
                out.append((name, json.loads(settings) if settings else {}))
            start = i + 1
    return out


def label(name: str, settings: dict) -> str:
    return name + (json.dumps(settings, separators=(",", ":")) if settings else "")


class LayerLengths:
    """Tokens each decoder layer outputs in the next forward (the ones it computed)."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handles = [layer.register_forward_hook(self._record) for layer in model.model.layers]

    def _record(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.lengths.append(int(out.shape[1]))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def forward_once(model, ids, mask, name: str, settings: dict, device: str) -> tuple[float, float, kvpolicy.PolicyCache]:
    """One prefill: (seconds, CPU seconds of this process, the cache)."""
    cache = kvpolicy.make_cache(name, **settings)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    kvpolicy.prefill(model, ids, mask, cache)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, cache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-24")
    ap.add_argument("--layers", type=int, help="override the shape's depth")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--prompt", default="2048", help="prompt lengths, comma-separated")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated; the first is the baseline each ratio is taken against")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    model = build_model(shape, args.device, dtype)
    variants = parse_variants(args.variants)
    cuda = args.device.startswith("cuda")
    rows = []
    for n in [int(p) for p in args.prompt.split(",")]:
        gen = torch.Generator().manual_seed(n)
        ids = torch.randint(3, model.config.vocab_size, (args.rows, n), generator=gen).to(args.device)
        mask = torch.ones_like(ids)
        times = {label(*v): [] for v in variants}
        cpu_times = {label(*v): [] for v in variants}
        for name, settings in variants:  # warm-up, and what each variant computes and keeps
            _, _, cache = forward_once(model, ids, mask, name, settings, args.device)
            del cache
        facts = {}
        for rep in range(args.reps + 1):
            for name, settings in variants:
                key = label(name, settings)
                lengths = LayerLengths(model) if rep == 0 else None
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                seconds, cpu, cache = forward_once(model, ids, mask, name, settings, args.device)
                if lengths is not None:  # a rep of its own (hooks cost a little): not timed
                    lengths.remove()
                    layers = len(lengths.lengths)
                    kv = [max(r) for r in cache.valid_tokens_per_layer()]
                    facts[key] = {
                        "computed_tokens_per_layer": lengths.lengths,
                        "computed_share": round(sum(lengths.lengths) / (layers * n), 4),
                        "attention_share": round(sum(t * t for t in lengths.lengths) / (layers * n * n), 4),
                        "kv_tokens_per_layer": kv,
                        "kv_reduction": round(1 - sum(kv) / (layers * n), 4),
                        "kv_bytes": cache.memory_bytes(allocated=False),
                        "peak_forward_bytes": (torch.cuda.max_memory_allocated() - base) if cuda else None,
                    }
                else:
                    times[key].append(seconds)
                    cpu_times[key].append(cpu)
                del cache
        base_key = label(*variants[0])
        clock = cpu_times if not cuda else times
        for name, settings in variants:
            key = label(name, settings)
            best = min(clock[key])
            row = {"variant": key, "prompt": n, "rows": args.rows, "clock": "process_time" if not cuda else "wall",
                   "best_s": round(best, 4), "all_s": [round(t, 4) for t in clock[key]],
                   "wall_all_s": [round(t, 4) for t in times[key]],
                   "x_baseline": round(best / min(clock[base_key]), 3), **facts[key]}
            rows.append(row)
            print(f"{n} tokens  {key}: {best:.3f} s ({row['x_baseline']:.3f}x {base_key}); computed share "
                  f"{row['computed_share']:.3f}, attention share {row['attention_share']:.3f}, KV reduction "
                  f"{row['kv_reduction']:.3f}", flush=True)
    full_argv = sys.argv if argv is None else ["benchmarks/prune_prefill.py", *argv]
    meta = run_meta(full_argv, shape=args.shape, model_config=shape, dtype=str(dtype).replace("torch.", ""),
                    device=torch.cuda.get_device_name(0) if cuda else "cpu",
                    torch_threads=torch.get_num_threads(), baseline=base_key)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
