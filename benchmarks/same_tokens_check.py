"""Does a change of kvpolicy's code keep its tokens? Runs compiled_path_check's model and batch through
the eager path and plain (compiled) ``generate`` for each policy, and saves the tokens and kept positions,
so two checkouts' runs can be compared bit for bit (issue #24: the cache redesign must change nothing).

Run it from the root of the checkout under test (its ``benchmarks/compiled_path_check.py`` builds the
model and batch, its ``kvpolicy`` runs)::

    cd /path/to/old/checkout && PYTHONPATH=.:$DEPS python /path/to/benchmarks/same_tokens_check.py \
        --label old --out $OUT/old.pt
    python benchmarks/same_tokens_check.py --compare $OUT/old.pt $OUT/new.pt --json $OUT/same_tokens.json

``--compare`` exits 1 when any policy's tokens or kept positions differ between the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

DEFAULT_POLICIES = "full,pyramidinfer_54_floor,h2o-0.5,snapkv-0.5,tova"


def run(label: str, policies: list[str], steps: int, out: Path) -> None:
    sys.path.insert(0, str(Path.cwd() / "benchmarks"))
    import compiled_path_check as cpc  # the checkout's own: its model, batch and policy labels

    import kvpolicy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = cpc.build_model("small", device, torch.float32)
    inputs = cpc.make_batch(8, 300, 600, model.config.vocab_size, 0, device)
    saved: dict[str, Any] = {"label": label, "kvpolicy": str(Path(kvpolicy.__file__).resolve().parent),
                             "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "policies": {}}
    for policy in policies:
        name, overrides = cpc.policy_spec(policy)
        entry = {}
        for path, settings in (("eager", {"compiled_decode": False}), ("generate", {})):
            cache = kvpolicy.make_cache(name, **settings, **overrides)
            out_ids = cpc.greedy_generate(model, inputs, cache, steps).sequences
            entry[path] = {"tokens": out_ids.cpu(),
                           "kept": [cache.kept_positions(i).cpu().int() for i in range(len(cache.layers))],
                           "frozen": cache.is_frozen()}
            print(f"{label} {policy} {path}: frozen={cache.is_frozen()} kv={cache.kv_tokens_per_layer()}", flush=True)
        saved["policies"][policy] = entry
    torch.save(saved, out)


def compare(files: list[Path]) -> dict[str, Any]:
    runs = [torch.load(f) for f in files]
    base = runs[0]
    rows = []
    for policy, entry in base["policies"].items():
        for other in runs[1:]:
            for path in ("eager", "generate"):
                a, b = entry[path], other["policies"][policy][path]
                rows.append({
                    "policy": policy, "path": path, "base": base["label"], "other": other["label"],
                    "tokens_equal": torch.equal(a["tokens"], b["tokens"]),
                    "kept_equal": len(a["kept"]) == len(b["kept"])
                    and all(torch.equal(x, y) for x, y in zip(a["kept"], b["kept"])),
                    "frozen": [a["frozen"], b["frozen"]],
                })
            rows.append({"policy": policy, "path": "eager vs generate", "base": other["label"],
                         "other": other["label"],
                         "tokens_equal": torch.equal(other["policies"][policy]["eager"]["tokens"],
                                                     other["policies"][policy]["generate"]["tokens"]),
                         "kept_equal": all(torch.equal(x, y) for x, y in zip(other["policies"][policy]["eager"]["kept"],
                                                                             other["policies"][policy]["generate"]["kept"])),
                         "frozen": None})
    return {"devices": [r["device"] for r in runs], "labels": [r["label"] for r in runs], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", help="name of the checkout under test (run mode)")
    ap.add_argument("--out", type=Path, help="where to save the run (run mode)")
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--compare", type=Path, nargs="+", help="saved runs: the first against each other one")
    ap.add_argument("--json", type=Path, help="with --compare: write the comparison here")
    args = ap.parse_args(argv)
    if args.compare:
        result = compare(args.compare)
        for r in result["rows"]:
            print(f"{r['policy']:24s} {r['path']:18s} {r['base']} vs {r['other']}: tokens "
                  f"{'equal' if r['tokens_equal'] else 'DIFFER'}, kept {'equal' if r['kept_equal'] else 'DIFFER'}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0 if all(r["tokens_equal"] and r["kept_equal"] for r in result["rows"]) else 1
    if not (args.label and args.out):
        ap.error("give --label and --out to run, or --compare FILES")
    run(args.label, args.policies.split(","), args.steps, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
