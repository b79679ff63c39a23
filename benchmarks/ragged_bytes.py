"""KV bytes a head-adaptive policy frees, stored as rectangles (DynamicLayer) and head-ragged (RaggedLayer).

Why: issue #25 asks that kvzip and Ada-KV (``snapkv_adakv``) at ``compression_ratio=0.5`` free at least
0.48 of full's bytes; stored as rectangles, every KV head is padded to the layer's fullest, and they free
far less. Each case runs full and each policy through greedy ``generate`` on the embedded model, once
per layer kind, and records the bytes held after the prompt and at the end (``memory_bytes(allocated=False)``:
what is stored; ``allocated=True``, the headroom too, beside it), each as the share of full's freed, and
whether both kinds gave the same tokens. The prompts are the perplexity task's documents; a batched case
has rows of different lengths (left-padded).

    python benchmarks/ragged_bytes.py --dtype bfloat16 --json docs/benchmarks/ragged_bytes.json \\
        --markdown docs/benchmarks/ragged_bytes.md --plot docs/benchmarks/ragged_bytes.png

A name is a policy or a preset, ``@ratio`` sets its ``compression_ratio``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import kvpolicy
from kvpolicy.core.layers import DynamicLayer, RaggedLayer
from kvpolicy.core.registry import preset_config
from kvpolicy.evaluation import texts
from kvpolicy.models import load_model
from kvpolicy.provenance import markdown_provenance, run_meta

KINDS = {"rectangle": DynamicLayer, "ragged": RaggedLayer}


def parse_case(text: str) -> list[int]:
    """``2048`` (one row) or ``2048+1536`` (a batch of rows of those lengths)."""
    return [int(n) for n in text.split("+")]


def prompts(tokenizer: Any, lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    docs = texts.token_documents(tokenizer, len(lengths), max(lengths), seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (doc, n) in enumerate(zip(docs, lengths)):
        ids[row, width - n:] = torch.tensor(doc[:n])
        mask[row, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def run_one(model: Any, inputs: dict, spec: dict, kind: type, new_tokens: int, frozen: bool = False) -> dict[str, Any]:
    """``frozen``: decode over the compiled step's frozen layers (``compiled_decode=True``; on the CPU they run
    eagerly, with the storage CUDA's compiled step uses)."""
    cache = kvpolicy.make_cache(dict(spec), layer_kind=kind, compiled_decode=False)
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1, **{kvpolicy.cache_argument(model): cache})
    after_prompt = cache.memory_bytes(allocated=False)
    cache = kvpolicy.make_cache(dict(spec), layer_kind=kind, compiled_decode=frozen)
    with torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    packed = sum(bool(getattr(layer, "packed", False)) for layer in cache.layers)
    return {"bytes_prompt": after_prompt, "bytes_end": cache.memory_bytes(allocated=False),
            "bytes_end_allocated": cache.memory_bytes(allocated=True), "packed_layers": packed,
            "layers": len(cache.layers), "tokens": out[:, inputs["input_ids"].shape[1]:].tolist()}


def spec_of(name: str) -> dict:
    policy, _, ratio = name.partition("@")
    spec = preset_config(policy)  # a preset's settings, or the policy's name
    spec = dict(spec) if isinstance(spec, dict) else {"policy": policy}
    if ratio:
        spec["compression_ratio"] = float(ratio)
    return spec


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    dtype = getattr(torch, args.dtype)
    model, tok = load_model(dtype=dtype)
    names = ["full", *args.policies.split(",")]
    cases = [parse_case(c) for c in args.cases.split(",")]
    rows = []
    work = [(c, n, k) for c in cases for n in names for k in KINDS]
    with tqdm(total=len(work), desc="runs", unit="run") as bar:
        for lengths in cases:
            inputs = prompts(tok, lengths, args.seed)
            results = {}
            for name in names:
                for kind_name, kind in KINDS.items():
                    bar.set_postfix_str(f"{'+'.join(map(str, lengths))} {name} {kind_name}")
                    results[name, kind_name] = run_one(model, inputs, spec_of(name), kind, args.new_tokens,
                                                       args.compiled_decode)
                    bar.update()
            full = results["full", "ragged"]
            for name in names[1:]:
                row = {"case": "+".join(map(str, lengths)), "policy": name}
                for kind_name in KINDS:
                    r = results[name, kind_name]
                    row[kind_name] = {**{k: v for k, v in r.items() if k != "tokens"},
                                      "freed_prompt": 1 - r["bytes_prompt"] / full["bytes_prompt"],
                                      "freed_end": 1 - r["bytes_end"] / full["bytes_end"]}
                row["same_tokens"] = results[name, "rectangle"]["tokens"] == results[name, "ragged"]["tokens"]
                rows.append(row)
    return {"rows": rows}


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        "# KV bytes freed: rectangles vs head-ragged layers",
        "",
        *markdown_provenance(meta, f"SmolLM2-135M-Instruct ({meta['dtype']})"),
        "",
        "Share of full's KV bytes freed (stored bytes, `memory_bytes(allocated=False)`), after the prompt and after "
        f"{meta['new_tokens']} greedy tokens; same tokens: both kinds generated the same tokens. Decoded over "
        + ("the compiled step's frozen layers (`compiled_decode=True`)." if meta.get("compiled_decode") else
           "the growing layers (`compiled_decode=False`)."),
        "",
        "| prompt (rows) | policy | rectangle, prompt | ragged, prompt | rectangle, end | ragged, end "
        "| ragged layers | same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        a, b = r["rectangle"], r["ragged"]
        lines.append(f"| {r['case']} | {r['policy']} | {a['freed_prompt']:.3f} | {b['freed_prompt']:.3f} | "
                     f"{a['freed_end']:.3f} | {b['freed_end']:.3f} | {b['packed_layers']}/{b['layers']} | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    labels = [f"{r['policy']}\n{r['case']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], [r["rectangle"]["freed_prompt"] for r in rows], 0.4, label="rectangle")
    ax.bar([i + 0.2 for i in x], [r["ragged"]["freed_prompt"] for r in rows], 0.4, label="head-ragged")
    ax.axhline(0.48, color="k", lw=0.8, ls="--", label="target 0.48")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("share of full's KV bytes freed (after the prompt)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="kvzip@0.5,snapkv_adakv@0.5,pyramidkv_adakv@0.5,snapkv@0.5")
    ap.add_argument("--cases", default="2048,4096,2048+1536", help="prompts: lengths, '+' joins rows of a batch")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compiled-decode", action="store_true",
                    help="decode over the compiled step's frozen layers (run eagerly off CUDA): its bytes at the end")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    data = measure(args)
    data["meta"] = run_meta(["python", "benchmarks/ragged_bytes.py", *(sys.argv[1:] if argv is None else argv)],
                            tool="ragged_bytes", dtype=args.dtype, new_tokens=args.new_tokens,
                            compiled_decode=args.compiled_decode)
    print(markdown(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(data))
    if args.plot:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
