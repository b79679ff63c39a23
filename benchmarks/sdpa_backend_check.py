"""Eager decode step with cuDNN SDPA on and off (GPU): the check behind change 1 in
docs/benchmarks/throughput.md (cuDNN builds an execution plan per new key length, and a
compressed layer's length changes every step).

    python benchmarks/sdpa_backend_check.py --policies pyramidinfer,h2o,full --batch 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="pyramidinfer,h2o,full", help=f"from: {', '.join(tp.POLICIES)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("this check needs a CUDA GPU (cuDNN attention exists only there)", file=sys.stderr)
        return 2
    model = tp.build_model("llama2-7b", "cuda", torch.bfloat16)
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for policy in args.policies.split(","):
            r = tp.run_once(model, policy, args.batch, args.prompt, args.new_tokens, "cuda")
            print(f"cudnn={cudnn} {policy}: {r['decode_step_ms']:.1f} ms per decode step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
