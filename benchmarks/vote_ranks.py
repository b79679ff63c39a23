"""Where a model's PyramidInfer votes find a needle: per layer, the rank of the needle's digits in the votes.

For ``prefill_mode="prune_hidden"`` the first layer that cuts the hidden states decides what every deeper
layer can keep (the kept sets are nested), so it must be a layer whose votes already rank what later
tokens need high. This runs each prompt of a needle set (tests/needles.py) alone through a cache-only
prefill of ``--preset`` (every layer sees the whole prompt), records each layer's votes (the scores its
plan ranks by) and prints, per layer, the worst rank of the code's digit tokens as a share of the prompt
(0.05: all digits are in the top 5%) for each prompt, and how many prompts keep every digit within the
layer's own budget (its kept share). ``prune_hidden_start`` is then best put at or below a layer from
which the worst ranks stay under the budget.

    OMP_NUM_THREADS=1 python benchmarks/vote_ranks.py --seed 7 --preset pyramidinfer_54_floor \\
        --json docs/benchmarks/raw/prune_hidden_start/vote_ranks_seed7.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import needles  # noqa: E402

from kvpolicy import cache_argument, make_cache  # noqa: E402
from kvpolicy.models import load_model  # noqa: E402
from kvpolicy.policies import pyramidinfer  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402


def digit_positions(tokenizer, ids: list[int], code: str) -> list[int]:
    """Positions of the code's tokens in ``ids`` (the needle sentence's `` is CODE.``, less `` is`` and ``.``)."""
    sentence = tokenizer(f" is {code}.", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(sentence)] == sentence)
    return list(range(start + 1, start + len(sentence) - 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=needles.TEST_SEED)
    ap.add_argument("--preset", default="pyramidinfer_54_floor")
    ap.add_argument("--model", help="a folder or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    model, tokenizer = load_model(args.model)
    inputs, answers, lengths = needles.build(tokenizer, seed=args.seed)
    captured: list[tuple[int, torch.Tensor, int]] = []
    plan_prefill = pyramidinfer.PyramidInferPolicy._plan_prefill

    def recording(self, view):
        plan = plan_prefill(self, view)
        if plan is not None:
            captured.append((view.layer_idx, plan.scores[0, 0].float().clone(), int(plan.keep[0])))
        return plan

    pyramidinfer.PyramidInferPolicy._plan_prefill = recording
    prompts = []
    try:
        for row, (code, n) in enumerate(zip(answers, lengths)):
            ids = inputs["input_ids"][row, -n:].unsqueeze(0)
            digits = digit_positions(tokenizer, ids[0].tolist(), code)
            captured.clear()
            cache = make_cache(args.preset, prefill_mode="cache_only")
            with torch.no_grad():
                model(input_ids=ids, logits_to_keep=1, **{cache_argument(model): cache})
            layers = {}
            for layer, scores, keep in captured:  # cache-only: slot i holds token i before the layer's compaction
                rank = torch.empty_like(scores, dtype=torch.long)
                rank[scores.argsort(descending=True, stable=True)] = torch.arange(len(scores))
                layers[layer] = {"worst_rank_share": round(int(rank[digits].max()) / n, 4),
                                 "kept_share": round(keep / n, 4)}
            prompts.append({"code": code, "prompt_len": n, "digit_positions": digits, "layers": layers})
    finally:
        pyramidinfer.PyramidInferPolicy._plan_prefill = plan_prefill
    summary = []
    for layer in sorted(prompts[0]["layers"]):
        worst = [p["layers"][layer]["worst_rank_share"] for p in prompts]
        within = sum(p["layers"][layer]["worst_rank_share"] < p["layers"][layer]["kept_share"] for p in prompts)
        kept = prompts[0]["layers"][layer]["kept_share"]
        summary.append({"layer": layer, "worst_rank_share": worst, "kept_share_prompt0": kept,
                        "prompts_keeping_every_digit": within})
        print(f"layer {layer:2d}  kept {kept:.2f}  digits all kept in {within}/{len(prompts)}  worst rank "
              + " ".join(f"{w:.2f}" for w in worst), flush=True)
    if args.json:
        full_argv = sys.argv if argv is None else ["benchmarks/vote_ranks.py", *argv]
        meta = run_meta(full_argv, preset=args.preset, needle_seed=args.seed, prompt_lengths=lengths)
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "prompts": prompts}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
