"""How keys and values are best quantized: per token (one scale per vector) or per channel (KIVI's keys).

Why: issue #25 asks to measure int8 with per-token-per-head scales against KIVI-style per-channel keys /
per-token values before picking one, and int4 (group-wise) is the stretch goal. Evicting single tokens
favours per-token scales (a scale shared by a group of tokens outlives any of them); this script measures
what quality the choice costs, without eviction, on the embedded model.

Each document's first ``--context`` tokens are the prompt (cached; stored quantized, attended exactly by
their own forward, as kvpolicy does), and the next ``--continuation`` tokens are scored in one forward
that attends the quantized prompt. Reported per scheme: the continuation's perplexity as a ratio to the
exact cache's, and the relative error of the stored keys and values (Frobenius norm), over documents.

    python benchmarks/key_quant_error.py --json docs/benchmarks/key_quant_error.json \\
        --markdown docs/benchmarks/key_quant_error.md

Schemes: ``token``: symmetric absmax codes, one scale per (token, head) vector (what kvpolicy stores);
``channel``: one scale per (head, channel) over groups of ``--group`` consecutive tokens (KIVI's keys;
values stay per token, as KIVI does); bits 8 or 4; ``kvpolicy``: keys and values through kvpolicy's
``kv_dtype="int4"`` codec (per token, asymmetric, a scale and minimum per group of 32 channels). The
newest tokens are not kept exact here (KIVI's residual window would).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.cache_utils import DynamicLayer as HFDynamicLayer

from kvpolicy.core.layers import choose_codec
from kvpolicy.evaluation import texts
from kvpolicy.models import load_model
from kvpolicy.provenance import markdown_provenance, run_meta


def quantize(x: torch.Tensor, bits: int, dim: int, group: int | None = None) -> torch.Tensor:
    """``x`` ``[B, H, L, D]`` through symmetric absmax codes of ``bits`` bits and back, one scale over
    ``dim`` (-1: per vector; 2: per channel, within groups of ``group`` tokens)."""
    top = 2 ** (bits - 1) - 1
    xf = x.float()
    if dim == 2 and group:
        b, h, n, d = xf.shape
        pad = (-n) % group
        padded = torch.cat([xf, xf.new_zeros(b, h, pad, d)], 2) if pad else xf
        grouped = padded.view(b, h, -1, group, d)
        scale = (grouped.abs().amax(3, keepdim=True) / top).clamp_min(torch.finfo(torch.float32).tiny)
        back = ((grouped / scale).round().clamp(-top, top) * scale).view(b, h, -1, d)[:, :, :n]
        return back.to(x.dtype)
    scale = (xf.abs().amax(dim, keepdim=True) / top).clamp_min(torch.finfo(torch.float32).tiny)
    return ((xf / scale).round().clamp(-top, top) * scale).to(x.dtype)


#: name -> (key bits, key layout, value bits or None: values exact, to see what the keys alone cost); layout
#: "kvpolicy": keys and values through kvpolicy's own ``kv_dtype="int4"`` codec (asymmetric, per token, groups
#: of 32 channels with a bfloat16 scale and minimum each)
SCHEMES: dict[str, tuple[int, str, int | None]] = {
    "int8 token": (8, "token", 8), "int8 channel-keys": (8, "channel", 8),
    "int4 token": (4, "token", 4), "int4 channel-keys": (4, "channel", 4),
    "int4 token keys, exact values": (4, "token", None), "int4 channel keys, exact values": (4, "channel", None),
    "int4 kvpolicy (token, groups of 32 channels)": (4, "kvpolicy", 4),
    "int4 kvpolicy keys, exact values": (4, "kvpolicy", None),
}


def through_codec(x: torch.Tensor) -> torch.Tensor:
    """``x`` through kvpolicy's ``kv_dtype="int4"`` codec and back."""
    codec = choose_codec("int4")
    return codec.decode(codec.encode(x), x.dtype)


def quantized_cache(bits: int, layout: str, value_bits: int | None, group: int,
                    errors: list[tuple[float, float]]) -> Cache:
    """transformers' cache whose layers store the prompt quantized; its own forward attends it exactly."""

    class QuantLayer(HFDynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            first = not self.is_initialized
            if first:
                if layout == "token":
                    k = quantize(key_states, bits, -1)
                elif layout == "kvpolicy":
                    k = through_codec(key_states)
                else:
                    k = quantize(key_states, bits, 2, group)
                if value_bits is None:
                    v = value_states
                else:
                    v = through_codec(value_states) if layout == "kvpolicy" else quantize(value_states, value_bits, -1)
                errors.append(((k - key_states).norm().item() / key_states.norm().item(),
                               (v - value_states).norm().item() / value_states.norm().item()))
                super().update(k, v, *args, **kwargs)
                return key_states, value_states
            return super().update(key_states, value_states, *args, **kwargs)

    return Cache(layer_class_to_replicate=QuantLayer)


def continuation_nll(model: Any, ids: torch.Tensor, context: int, cache: Cache | None) -> float:
    """Mean negative log-likelihood of ``ids[context:]`` given the cached ``ids[:context]``."""
    with torch.no_grad():
        kwargs = {} if cache is None else {"past_key_values": cache}
        out = model(input_ids=ids[:, :context], use_cache=True, **kwargs)
        cont = ids[:, context:]
        logits = model(input_ids=cont, past_key_values=out.past_key_values, use_cache=True).logits
        prev = out.logits[:, -1:]
        full = torch.cat([prev, logits[:, :-1]], 1).float()
        return torch.nn.functional.cross_entropy(full.flatten(0, 1), cont.flatten()).item()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    model, tok = load_model(dtype=getattr(torch, args.dtype))
    docs = texts.token_documents(tok, args.documents, args.context + args.continuation, args.seed)
    exact, per_scheme = [], {name: {"nll": [], "key_err": [], "value_err": []} for name in SCHEMES}
    with tqdm(total=len(docs) * (1 + len(SCHEMES)), desc="forwards", unit="doc") as bar:
        for doc in docs:
            ids = torch.tensor([doc])
            exact.append(continuation_nll(model, ids, args.context, None))
            bar.update()
            for name, (bits, layout, value_bits) in SCHEMES.items():
                errors: list[tuple[float, float]] = []
                cache = quantized_cache(bits, layout, value_bits, args.group, errors)
                nll = continuation_nll(model, ids, args.context, cache)
                row = per_scheme[name]
                row["nll"].append(nll)
                row["key_err"].append(sum(e[0] for e in errors) / len(errors))
                row["value_err"].append(sum(e[1] for e in errors) / len(errors))
                bar.update()
    base = sum(exact) / len(exact)
    rows = []
    for name, row in per_scheme.items():
        nll = sum(row["nll"]) / len(row["nll"])
        rows.append({"scheme": name, "ppl_ratio": math.exp(nll - base),
                     "key_rel_error": sum(row["key_err"]) / len(row["key_err"]),
                     "value_rel_error": sum(row["value_err"]) / len(row["value_err"]), "nll_per_doc": row["nll"]})
    return {"exact_ppl": math.exp(base), "exact_nll_per_doc": exact, "rows": rows}


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        "# Quantizing keys per token or per channel",
        "",
        *markdown_provenance(meta, f"SmolLM2-135M-Instruct ({meta['dtype']})"),
        "",
        f"{meta['documents']} documents: a {meta['context']}-token prompt stored quantized, the next "
        f"{meta['continuation']} tokens scored attending it. Exact cache: perplexity {data['exact_ppl']:.3f}. "
        f"Per-channel keys use groups of {meta['group']} tokens; values are per token in every scheme "
        "(kvpolicy's int4: per token, in groups of 32 channels).",
        "",
        "Perplexity ratio: the mean NLL's difference from the exact cache's, over the same documents (paired).",
        "",
        "| scheme | perplexity / exact | key error (rel.) | value error (rel.) |",
        "|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['scheme']} | {r['ppl_ratio']:.4f} | {r['key_rel_error']:.4f} "
                     f"| {r['value_rel_error']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=6)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--group", type=int, default=32, help="tokens sharing a per-channel key scale (KIVI: 32)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    data = measure(args)
    data["meta"] = run_meta(["python", "benchmarks/key_quant_error.py", *(sys.argv[1:] if argv is None else argv)],
                            tool="key_quant_error", dtype=args.dtype, documents=args.documents, context=args.context,
                            continuation=args.continuation, group=args.group)
    print(markdown(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
