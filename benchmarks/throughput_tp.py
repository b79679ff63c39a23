"""benchmarks/throughput.py under transformers' tensor parallelism: the same runs, policies, JSON rows and
largest-batch search, with each layer's heads (and KV cache) split over the ranks of ``torchrun``.

    torchrun --nproc_per_node 2 benchmarks/throughput_tp.py --shape llama2-70b --prompt-lens 2048 \\
        --new-tokens 256 --batch-sizes 8,32 --policies hf-static,pyramidinfer-floor-generate \\
        --max-batch --json docs/benchmarks/raw/tp/llama2-70b_2048_256.json

Every rank runs every step (a tensor-parallel group computes one batch together); rank 0 prints and
writes. Options are throughput.py's (``--help`` lists them) plus the few below. What differs:

* **The model** is ``from_pretrained(None, config=..., state_dict={})`` with transformers' tensor
  parallelism (``kvpolicy.core.parallel.from_pretrained_kwargs``): built on the meta device, sharded by
  the model's plan, and every weight then missing, so each rank allocates and randomly initialises only
  its own shards. A 70B bf16 model never exists whole on one GPU (about 69 GB of weights per H200 at
  2 ranks). The vocabulary is rounded up to a multiple of the ranks (transformers shards ``lm_head``'s
  output evenly; 32,000 already is). On a CPU (dry runs) the model is saved by rank 0 and loaded from
  that checkpoint instead, which transformers 5.2 needs there.
* **The ranks agree**: every run's prompts and sampling are seeded alike on every rank; a run that runs
  out of memory on any rank counts as out of memory on all; a run's peak memory, and the memory the
  model holds, are the largest rank's.
  So the largest-batch search takes the same steps everywhere. (Ranks of one group allocate the same
  sizes in the same order, so they run out of memory at the same allocation; if one did not, the other
  would wait in a collective: ``--timeout-min`` bounds that wait.)
* **KV bytes are per GPU**: each rank's cache holds its share of the heads (``kv_bytes_per_seq`` of a
  2-rank run is half the model's KV per sequence).
* kvpolicy caches through ``generate`` get ``decode_reserve = --new-tokens``: their frozen buffers are
  sized once, so a long generation never re-compiles the step for a re-size.
* More policy labels: ``h2o-budget-generate`` and ``streamingllm-budget-generate`` keep at most
  ``--budget`` tokens per layer and head while generating (evicting every 16 steps), and
  ``pyramidinfer-floor-gen40-generate`` is ``pyramidinfer_54_floor`` with decode groups keeping less
  (``gen_compress_ratio=0.4``, preset: 0.8); ``tova-budget-generate`` (``--budget`` tokens per layer)
  reduces its scores across the ranks at every layer of every step, the reduction's worst case.
* ``--warmup-tokens N`` shortens the untimed warm-up call of kvpolicy caches through ``generate`` (their
  frozen buffers do not depend on the call's length, so the timed call replays the step the warm-up
  compiled): a long generation is not decoded twice. ``hf-static``'s cache is sized by the call's length,
  so its warm-up stays whole.
* Each row records ``tp_size`` and the score reductions by phase (``reduction_calls``, elements gathered;
  ``reduction_scope`` says whether they cover the timed call alone, as for the ``-generate`` labels, or
  the warm-up too). At ``--profile-batch`` a second, synchronised run times them:
  ``reduction_prefill_ms`` (the prompt's) and ``reduction_ms_per_step`` (the decode steps', over their
  number, to set beside ``decode_step_ms``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (benchmarks/throughput.py: its runs, policies and search)

kvpolicy = throughput.kvpolicy  # the kvpolicy throughput.py imported (PYTHONPATH first, then this checkout)

SCRIPT = "benchmarks/throughput_tp.py"
EVICT_EVERY = 16


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def build_model(shape: str, device: str, dtype: torch.dtype):
    """The shape's Llama with random weights, sharded over the ranks by transformers' own plan."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from kvpolicy.core import parallel

    world = tp_size()
    config = LlamaConfig(**throughput.SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.vocab_size = -(-config.vocab_size // world) * world
    kwargs = dict(dtype=dtype, attn_implementation="sdpa", **parallel.from_pretrained_kwargs(world))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # every weight is "missing": that is the point
    try:
        if device.startswith("cuda"):
            model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict={}, **kwargs)
        else:  # CPU dry run: through a checkpoint of the small model (transformers 5.2 cannot shard on a CPU otherwise)
            with tempfile.TemporaryDirectory() as tmp:
                path = [tmp]
                dist.broadcast_object_list(path, src=0)
                if dist.get_rank() == 0:
                    torch.manual_seed(0)
                    LlamaForCausalLM(config).save_pretrained(path[0])
                dist.barrier()
                model = LlamaForCausalLM.from_pretrained(path[0], **kwargs)
                dist.barrier()  # rank 0 removes the directory when every rank has read it
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


def _local_numel(model) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def agree(value: float, op=None) -> float:
    """``value`` reduced over the ranks (max by default), so that every rank decides alike."""
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op or dist.ReduceOp.MAX)
    return t.item()


def try_run(model, policy, batch, prompt, new, device, options=None):
    """throughput.try_run with the ranks in step: the same seed, out of memory anywhere is out of memory
    everywhere, the largest rank's peak memory; and the score reductions counted (timed at the profile batch)."""
    from kvpolicy.core import parallel

    stats = parallel.STATS
    torch.manual_seed(1000 + batch)
    stats.reset()
    WARMUP["pending"], TIMED_ONLY[0] = True, False
    result = ORIGINAL["try_run"](model, policy, batch, prompt, new, device, options)
    if agree(result is None):
        return None
    if result.get("peak_memory_bytes") is not None:
        result["peak_memory_bytes"] = int(agree(result["peak_memory_bytes"]))
    result.update(tp_size=tp_size(), reduction_calls=dict(stats.calls), reduction_elements=dict(stats.elements),
                  reduction_scope="timed call" if TIMED_ONLY[0] else "warm-up and timed calls")
    if (options or {}).get("profile") and stats.calls:
        torch.manual_seed(1000 + batch)
        stats.reset()
        stats.timing = True
        WARMUP["pending"], TIMED_ONLY[0] = True, False
        try:
            timed = ORIGINAL["try_run"](model, policy, batch, prompt, new, device, options)
        finally:
            stats.timing = False
        if not agree(timed is None):
            seconds = {phase: agree(s) for phase, s in sorted(stats.seconds.items())}
            result["reduction_prefill_ms"] = 1000 * seconds.get("prefill", 0.0)
            result["reduction_ms_per_step"] = 1000 * seconds.get("decode", 0.0) / (new - 1)
    return result


class AgreedMemory(list):
    """throughput.BASE_MEMORY (the bytes the model holds, set once it is built) as the largest rank's: the
    largest-batch search predicts from it, and every rank must predict the same batch."""

    def __setitem__(self, index, value):
        super().__setitem__(index, int(agree(value)))


TIMED_ONLY = [False]  # whether the reductions counted cover the timed call alone (generate labels)
WARMUP = {"tokens": 0, "pending": False}  # --warmup-tokens, and whether the next generate call is a run's warm-up


def generate_through_generate(model, policy, ids, mask, tokens, *args, **kwargs):
    """throughput.generate_through_generate, its run's warm-up call shortened to ``--warmup-tokens``: the
    frozen buffers are sized by ``decode_reserve`` (the run's new tokens), not by the call's length, so a
    short warm-up compiles and records the very step the timed call replays."""
    from kvpolicy.core import parallel

    if WARMUP["pending"]:
        if WARMUP["tokens"]:
            tokens = min(tokens, WARMUP["tokens"])
    else:  # the timed call: the reductions are counted from here
        parallel.STATS.reset()
        TIMED_ONLY[0] = True
    WARMUP["pending"] = False
    return ORIGINAL["generate_through_generate"](model, policy, ids, mask, tokens, *args, **kwargs)


def register_policies(new_tokens: int, budget: int) -> None:
    """The extra labels, and ``decode_reserve`` for every kvpolicy cache through ``generate``."""
    make = kvpolicy.make_cache
    extra = {
        "h2o-budget-generate": lambda: make("h2o", budget=budget, evict_every=EVICT_EVERY),
        "streamingllm-budget-generate": lambda: make("streamingllm", budget=budget, evict_every=EVICT_EVERY),
        "pyramidinfer-floor-gen40-generate": lambda: make("pyramidinfer_54_floor", gen_compress_ratio=0.4),
        # one score reduction per layer at every step: the worst case for the reduction's cost
        "tova-budget-generate": lambda: make("tova", budget=budget),
    }
    for name, factory in extra.items():
        throughput.GENERATE_POLICIES[name] = (factory, throughput.GREEDY)
        throughput.POLICIES[name] = "generate"

    def reserved(factory):
        def make_reserved():
            cache = factory()
            cache.decode_reserve = max(cache.decode_reserve, new_tokens)
            return cache

        return make_reserved

    for name, (factory, sampling) in list(throughput.GENERATE_POLICIES.items()):
        throughput.GENERATE_POLICIES[name] = (reserved(factory), sampling)


ORIGINAL: dict[str, Any] = {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    ap.add_argument("--budget", type=int, default=512, help="tokens per layer and head of the *-budget-* labels")
    ap.add_argument("--warmup-tokens", type=int, default=0,
                    help="kvpolicy caches through generate: tokens of each run's untimed warm-up call (0: as many "
                         "as the timed call, as throughput.py)")
    ap.add_argument("--timeout-min", type=float, default=20.0,
                    help="how long a rank waits in a collective before the run is aborted")
    given = sys.argv[1:] if argv is None else list(argv)
    ours, rest = ap.parse_known_args(given)
    if "-h" in rest or "--help" in rest:
        ap.print_help()
        print("\nand every option of benchmarks/throughput.py:")
        return throughput.main(["--help"])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = rest[rest.index("--device") + 1] if "--device" in rest else default_device
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            print("run under torchrun: torchrun --nproc_per_node N benchmarks/throughput_tp.py ...", file=sys.stderr)
            return 2
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=ours.timeout_min))
    rank = dist.get_rank()
    new_tokens = int(rest[rest.index("--new-tokens") + 1]) if "--new-tokens" in rest else 256
    register_policies(new_tokens, ours.budget)
    if any(throughput.POLICIES.get(p) == "kvpress" for p in _policies(rest)):
        print("kvpress presses do not run under tensor parallelism here", file=sys.stderr)
        return 2

    ORIGINAL.setdefault("try_run", throughput.try_run)
    ORIGINAL.setdefault("run_meta", throughput.run_meta)
    ORIGINAL.setdefault("build_model", throughput.build_model)
    ORIGINAL.setdefault("generate_through_generate", throughput.generate_through_generate)
    WARMUP["tokens"] = ours.warmup_tokens
    built: dict[str, int] = {}

    def build(shape, device, dtype):
        model = build_model(shape, device, dtype)
        with torch.device("meta"):  # the whole model's count (transformers 5.2's shards are plain tensors)
            whole = type(model)(model.config)
        built.update(params_per_rank=_local_numel(model), params=sum(p.numel() for p in whole.parameters()))
        return model

    def run_meta(_argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        return ORIGINAL["run_meta"]([SCRIPT, *given], tp_size=tp_size(),
                                    launcher=f"torchrun --nproc_per_node {tp_size()}",
                                    kv_bytes="per GPU (each rank holds its KV heads)", **built, **extra)

    throughput.try_run, throughput.run_meta, throughput.build_model = try_run, run_meta, build
    throughput.generate_through_generate = generate_through_generate
    throughput.BASE_MEMORY = AgreedMemory(throughput.BASE_MEMORY)
    args = list(rest)
    if rank != 0 and "--json" in args:  # rank 0 writes
        i = args.index("--json")
        del args[i : i + 2]
    quiet = open(os.devnull, "w") if rank != 0 else None  # noqa: SIM115
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            code = throughput.main(args if "--device" in args else [*args, "--device", device])
    finally:
        throughput.try_run, throughput.run_meta, throughput.build_model = (
            ORIGINAL["try_run"], ORIGINAL["run_meta"], ORIGINAL["build_model"])
        throughput.generate_through_generate = ORIGINAL["generate_through_generate"]
        throughput.BASE_MEMORY = list(throughput.BASE_MEMORY)
        if quiet:
            quiet.close()
    dist.barrier()
    return code


def _policies(argv: list[str]) -> list[str]:
    return argv[argv.index("--policies") + 1].split(",") if "--policies" in argv else []


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(code)
