"""Run NVIDIA kvpress presses on the same model, inputs and tasks as ``kvpolicy compare``.

Why: kvpolicy's policies should be judged against an independent implementation of the same
ideas. kvpress compresses the prompt inside each attention layer's forward hook and never
compresses generated tokens; we feed every task's forwards through a plain ``DynamicCache``
inside ``with press(model):``, so prefill is compressed by the press and the scored / generated
tokens see what it kept, exactly as our ``ppl``/``needle``/``agreement`` tasks do for our caches.

kvpress needs transformers<5.3, so this runs in its own environment, e.g.::

    python3 -m venv --system-site-packages /tmp/kvp
    /tmp/kvp/bin/pip install "transformers>=5.2,<5.3" kvpress
    /tmp/kvp/bin/python benchmarks/kvpress_compare.py --ratios 0.2,0.4,0.6,0.8 \
        --out docs/benchmarks/kvpress_compare.md --json docs/benchmarks/kvpress_compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpolicy.evaluation import tasks as task_mod  # noqa: E402
from kvpolicy.evaluation.measure import Meter  # noqa: E402
from kvpolicy.evaluation.report import environment  # noqa: E402
from kvpolicy.evaluation.runner import _add_reductions, _row, _warm_up, PolicySpec  # noqa: E402
from kvpolicy.models import load_model  # noqa: E402


class MeasuredDynamicCache(DynamicCache):
    """DynamicCache with the reporting methods the Meter reads from our PolicyCache."""

    def kv_tokens_per_layer(self) -> list[int]:
        return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None else 0 for layer in self.layers]

    def memory_bytes(self, allocated: bool = True) -> int:
        total = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None and t.numel():
                    total += t.numel() * t.element_size()
        return total


def presses(names: list[str], ratio: float):
    import kvpress

    table = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio),
        "streamingllm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "observed_attention": lambda: kvpress.ObservedAttentionPress(compression_ratio=ratio),
    }
    return [(n, table[n]()) for n in names]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--presses", default="snapkv,pyramidkv,streamingllm,tova,expected_attention,knorm")
    ap.add_argument("--ratios", default="0.2,0.4,0.6,0.8")
    ap.add_argument("--tasks", default="ppl,needle,agreement")
    ap.add_argument("--sizes", default="sweep")
    ap.add_argument("--json")
    ap.add_argument("--out", help="markdown table to write")
    args = ap.parse_args()
    task_names = args.tasks.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.presses.split(",")
    sizes = task_mod.PRESETS[args.sizes]
    attn = "eager" if "observed_attention" in names else "sdpa"  # ObservedAttention needs attention weights
    model, tok = load_model(args.model, attn_implementation=attn)
    _warm_up(model, tok)
    prepared = []
    for name in task_names:
        t = task_mod.TASKS[name]()
        t.prepare(tok, sizes)
        prepared.append(t)
    runs = [("full", None, None)] + [(n, r, p) for r in ratios for n, p in presses(names, r)]
    refs: dict = {}
    rows = []
    start = time.time()
    for i, (name, ratio, press) in enumerate(runs):
        meter, metrics = Meter(), {}
        for t in prepared:
            print(f"[{i + 1}/{len(runs)}] {name}@{ratio}: {t.name} ({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
            if press is None:
                res = t.run(model, MeasuredDynamicCache, meter, refs.get(t.name))
                refs[t.name] = res.reference
            else:
                with press(model):
                    res = t.run(model, MeasuredDynamicCache, meter, refs.get(t.name))
            metrics.update(res.metrics)
        spec = PolicySpec(name, {"compression_ratio": ratio} if ratio is not None else {}, ratio)
        row = _row(spec, meter, metrics, None)
        row["implementation"] = "kvpress"
        rows.append(row)
    _add_reductions(rows)
    env = environment()
    import kvpress  # noqa: F401
    from importlib.metadata import version

    env["kvpress"] = version("kvpress")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "sizes": args.sizes, "rows": rows}, indent=1) + "\n")
    keys = [k for n in task_names for k in task_mod.TASKS[n].metric_keys]
    lines = ["| press | ratio | KV reduction | decode tok/s | " + " | ".join(keys) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for r in rows:
        vals = [f"{r[k]:.3f}" if k.startswith("ppl") else f"{r[k]:.0%}" for k in keys]
        lines.append(f"| {r['policy']} | {r['ratio'] if r['ratio'] is not None else '-'} | {r['kv_reduction']:.1%} | "
                     f"{r['decode_tokens_per_s']:.1f} | " + " | ".join(vals) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        header = (f"# kvpress on the same tasks\n\nkvpress {env['kvpress']}, transformers {env['transformers']}, "
                  f"torch {env['torch']}, sizes preset `{args.sizes}`, default model (SmolLM2-135M-Instruct Q4_1 GGUF, "
                  f"dequantized to float32), CPU. Command:\n\n```\n{' '.join(sys.argv)}\n```\n\n")
        Path(args.out).write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
