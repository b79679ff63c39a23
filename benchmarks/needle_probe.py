"""Needle set of tests/test_real_model.py (6 prompts, 1.6k-1.8k tokens) under chosen policy settings.

    python benchmarks/needle_probe.py 'full' 'snapkv:{"compression_ratio":0.54}' \
        'pyramidinfer:{"prefill_recent_ratio":0.1,"prefill_decay_ratio":0.3}'

Prints, per variant, codes found out of 6 and the KV reduction (kept / seen over all layers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import needles  # noqa: E402

from kvpolicy.models import load_model  # noqa: E402


def main(argv: list[str]) -> int:
    model, tokenizer = load_model()
    inputs, answers, lengths = needles.build(tokenizer)
    print("prompt lengths", lengths)
    for spec in argv:
        name, _, settings = spec.partition(":")
        overrides = json.loads(settings) if settings else {}
        found, decoded, reduction = needles.run(model, tokenizer, inputs, answers, lengths, name, **overrides)
        print(json.dumps({"policy": name, "settings": overrides, "found": sum(found), "of": len(found),
                          "kv_reduction": round(reduction, 3), "first_answers": decoded[:2]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
