"""Needle set of tests/test_real_model.py (6 prompts, 1.6k-1.8k tokens) under chosen policy settings.

    python benchmarks/needle_probe.py --json docs/benchmarks/needle.json 'full' \
        'snapkv:{"compression_ratio":0.54}' 'pyramidinfer:{"prefill_recent_ratio":0.1,"prefill_decay_ratio":0.3}'

Prints, per variant, codes found out of 6 and the KV reduction (1 - kept / seen over all layers);
``--json`` also writes them with the run's ``meta`` block (command and argv, git commit with a
dirty flag, versions, machine and threads, date: ``kvpolicy.provenance.run_meta``) and the
prompt lengths and seed; ``--seed`` builds another set of 6 prompts (other passages, codes and
depths; the tests use seed 7); ``--hay-tokens N`` sets the haystack's length (default 1550; 7700
makes prompts of about 7.8k tokens, near SmolLM2's 8192 limit); ``--count N`` builds N prompts (the
first 6 are the default set's); ``--model PATH`` (a folder or .gguf; default: the embedded SmolLM2),
``--device`` and ``--dtype`` (float32, bfloat16) run it elsewhere, e.g. on a GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import needles  # noqa: E402

from kvpolicy.models import load_model  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402


def results(rows: list[dict], argv: list[str], lengths: list[int], seed: int) -> dict:
    """The JSON file's content: ``{"meta": ..., "rows": rows}``; ``argv`` without the program."""
    full_argv = ["benchmarks/needle_probe.py", *argv]
    meta = run_meta(full_argv, prompt_lengths=lengths, needle_seed=seed)
    return {"meta": meta, "rows": rows}


def main(argv: list[str]) -> int:
    args = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: needle_probe.py [--json PATH] [--seed N] [--hay-tokens N] [--count N] "
              "[--model PATH] [--device D] [--dtype T] POLICY[:JSON] ... (POLICY: a policy or preset name, or a "
              "YAML file)")
        return 0 if argv else 2
    opts = {"--json": None, "--seed": "7", "--hay-tokens": "1550", "--count": "6", "--model": None,
            "--device": "cpu", "--dtype": "float32"}
    while argv[:1] and argv[0] in opts:
        opts[argv[0]] = argv[1]
        argv = argv[2:]
    out_path = Path(opts["--json"]) if opts["--json"] else None
    seed, hay_tokens = int(opts["--seed"]), int(opts["--hay-tokens"])
    import torch

    model, tokenizer = load_model(opts["--model"], dtype=getattr(torch, opts["--dtype"]), device=opts["--device"])
    inputs, answers, lengths = needles.build(tokenizer, count=int(opts["--count"]), hay_tokens=hay_tokens, seed=seed)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    print("prompt lengths", lengths)
    rows = []
    for spec in argv:
        name, _, settings = spec.partition(":")
        overrides = json.loads(settings) if settings else {}
        found, decoded, reduction = needles.run(model, tokenizer, inputs, answers, lengths, name, **overrides)
        row = {"policy": name, "settings": overrides, "found": sum(found), "of": len(found),
               "kv_reduction": round(reduction, 4), "first_answers": list(decoded[:2])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if out_path is not None:
        out_path.write_text(json.dumps(results(rows, args, lengths, seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
