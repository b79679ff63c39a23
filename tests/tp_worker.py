"""The cases of tests/test_tensor_parallel.py, and the script that runs them under tensor parallelism.

Run by the test as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_worker.py
MODEL_DIR OUT`` (gloo, CPU): each rank loads the saved tiny model with transformers' tensor
parallelism (``kvpolicy.core.parallel.from_pretrained_kwargs``), runs every case of :data:`CASES`
through :func:`run_case`, and rank 0 saves the results with the kept positions of all ranks gathered
into whole layers. The test runs the same :func:`run_case` in one process on the same weights and
compares.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch._dynamo.utils import counters

import kvpolicy

NEW = 10
LENGTHS = [40, 31]  # two rows, the second left-padded

#: settings under which each built-in policy compresses the test's short prompts, prefill and decode
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {},
    "pyramidinfer": dict(prefill_recent_ratio=0.2, prefill_decay_ratio=0.5, min_context_length=4,
                         exceed_length_to_compress=4, gen_recent_ratio=0.1, pool_kernel=3),
    "h2o": dict(compression_ratio=0.5, window_size=4, sink_size=2),
    "streamingllm": dict(budget=14, sink_size=2),
    "snapkv": dict(compression_ratio=0.5, window_size=4, kernel_size=3, compress="both"),
    "pyramidkv": dict(compression_ratio=0.5, window_size=4, kernel_size=3, beta=4.0),
    "random": dict(compression_ratio=0.5, window_size=4),
    "tova": dict(compression_ratio=0.5),
    "knorm": dict(compression_ratio=0.5, compress="both"),
    "expected_attention": dict(compression_ratio=0.5),
    "kvzip": dict(compression_ratio=0.5),
}

#: cases whose selections rank slots across a layer's KV heads (Ada-KV's split, KVzip's ranking over
#: layers and heads), or leave heads holding different counts: they gather every rank's heads
CROSS_HEAD = {"kvzip", "kvzip-layer", "snapkv-adaptive", "pyramidinfer-kv_head-adaptive"}

#: policies whose layers keep one token set for all heads from head-merged scores: these, and only
#: these, reduce across the tensor-parallel ranks
SHARED_SCORES = {"pyramidinfer", "tova"}


def cases() -> list[dict[str, Any]]:
    """Every built-in policy through plain ``generate`` (eager steps), then the variants: per-KV-head
    PyramidInfer, prune-hidden prefill, the frozen (static) decode path run eagerly and compiled
    (dynamo's ``eager`` backend, forced on the CPU as tests/test_compiled_generate.py does), row-chunked
    prefill, sampling, the selections ranking across heads (Ada-KV, KVzip's allocations), and deliberately
    broken reductions and gathers (the comparison must see them)."""
    out = [dict(name=p, policy=p, settings=SETTINGS.get(p, {})) for p in kvpolicy.available_policies()]
    pyr = SETTINGS["pyramidinfer"]
    out += [
        dict(name="pyramidinfer-kv_head", policy="pyramidinfer", settings=dict(pyr, head_aggregation="kv_head")),
        dict(name="pyramidinfer-prune_hidden", policy="pyramidinfer", settings=dict(pyr, prefill_mode="prune_hidden")),
        dict(name="pyramidinfer-top_p", policy="pyramidinfer", settings=pyr, sampling=True),
    ]
    for p in ("pyramidinfer", "tova", "h2o", "snapkv", "full"):
        out.append(dict(name=f"{p}-static", policy=p, settings=SETTINGS[p], compiled_decode=True))
    # the step traced by dynamo (one graph with the model's all-reduces from transformers 5.17), and the
    # reductions between steps
    out.append(dict(name="pyramidinfer-compiled", policy="pyramidinfer", settings=pyr, compiled_decode=True,
                    compiled=True))
    for p in ("pyramidinfer", "h2o"):
        out.append(dict(name=f"{p}-rows", policy=p, settings=SETTINGS[p], compiled_decode=True, rows=1))
    adaptive = dict(SETTINGS["snapkv"], head_budget="adaptive", compress="prefill")
    out.append(dict(name="snapkv-adaptive", policy="snapkv", settings=adaptive))
    # Ada-KV's split at the prompt, then decode groups evicting from heads that hold different counts
    out.append(dict(name="pyramidinfer-kv_head-adaptive", policy="pyramidinfer",
                    settings=dict(pyr, head_aggregation="kv_head", head_budget="adaptive")))
    for allocation in ("layer", "uniform"):
        out.append(dict(name=f"kvzip-{allocation}", policy="kvzip", settings=dict(SETTINGS["kvzip"],
                                                                                   allocation=allocation)))
    out.append(dict(name="pyramidinfer-broken", policy="pyramidinfer", settings=pyr, broken="reduced"))
    out.append(dict(name="pyramidinfer-unmerged", policy="pyramidinfer", settings=pyr, broken="unmerged"))
    out.append(dict(name="kvzip-broken", policy="kvzip", settings=SETTINGS["kvzip"], broken="ungathered"))
    out.append(dict(name="snapkv-adaptive-broken", policy="snapkv", settings=adaptive, broken="local_split"))
    return out


def batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class CollectiveCounter:
    """Counts ``torch.distributed`` collectives called from kvpolicy's own modules (the model's own
    all-reduces under tensor parallelism are not counted). Calls traced into a compiled step are not seen;
    kvpolicy's plans, where reductions happen, run eagerly between steps."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "reduce",
             "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
             "barrier", "send", "recv", "isend", "irecv")

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.calls: Counter[str] = Counter()
        for module in (dist, c10d):
            for name in self.NAMES:
                fn = getattr(module, name, None)
                if fn is not None and not getattr(fn, "_counted", False):
                    setattr(module, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            if torch.compiler.is_compiling():  # inside a traced step (the model's own all-reduce): invisible
                return fn(*args, **kwargs)
            if sys._getframe(1).f_globals.get("__name__", "").startswith("kvpolicy"):
                self.calls[name] += 1
            return fn(*args, **kwargs)

        counted._counted = True
        return counted

    def take(self) -> int:
        total = sum(self.calls.values())
        self.calls.clear()
        return total


def _local_mean(self, scores: torch.Tensor) -> torch.Tensor:
    """``LayerView.mean_over_heads`` as a rank-local mean that claims to be merged: what a missing
    reduction would keep."""
    self.heads_reduced = True
    return scores.mean(dim=1, keepdim=True)


def _unmerged_mean(self, scores: torch.Tensor) -> torch.Tensor:
    """A policy merging heads by itself (``scores.mean(dim=1)``): the cache must refuse it under
    tensor parallelism."""
    return scores.mean(dim=1, keepdim=True)


def _rank_local(self, t: torch.Tensor) -> torch.Tensor:
    """``LayerView.gather_heads`` that gathers nothing: this rank's heads repeated in place of every rank's
    (the shapes a gather gives, so every rank still slices its heads), KVzip's global ranking blind to the
    other ranks' scores."""
    return t.repeat(1, self.kv_heads // t.shape[1], *[1] * (t.dim() - 2))


def _never_across_heads(layer, plan) -> bool:
    """``compressor.ranks_across_heads`` saying no: Ada-KV's split over this rank's heads alone."""
    return False


def _broken(kind: str | None) -> tuple[type, str, Any]:
    """(class, attribute, replacement) that breaks a case on purpose (None: nothing)."""
    from kvpolicy.core import compressor
    from kvpolicy.core.policy import LayerView

    return {"reduced": (LayerView, "mean_over_heads", _local_mean),
            "unmerged": (LayerView, "mean_over_heads", _unmerged_mean),
            "ungathered": (LayerView, "gather_heads", _rank_local),
            "local_split": (compressor, "ranks_across_heads", _never_across_heads),
            None: (LayerView, "mean_over_heads", None)}[kind]


def run_case(model, case: dict[str, Any]) -> dict[str, Any]:
    """Greedy (or seeded top-p) generation of ``NEW`` tokens: the new tokens, and this process's kept
    positions ``[B, H_kv here, L]`` of every layer."""
    inputs = batch(model.config.vocab_size)
    cache = kvpolicy.make_cache(case["policy"], compiled_decode=case.get("compiled_decode", False),
                                **case["settings"])
    arg = kvpolicy.cache_argument(model)
    sampling = dict(do_sample=True, top_p=0.9, temperature=0.8) if case.get("sampling") else dict(do_sample=False)
    if case.get("compiled"):
        from transformers import CompileConfig

        # transformers 5.2's own tensor-parallel all-reduce does not trace in one graph (dynamo fails on its
        # ReduceOp); from 5.17 its layers shard through DTensor and the whole step traces
        config = CompileConfig(backend="eager", fullgraph=Version(transformers.__version__) >= Version("5.17"))
        config._compile_all_devices = True  # transformers compiles on GPUs only unless told
        sampling["compile_config"] = config
    graphs = counters["stats"]["unique_graphs"]
    owner, name, broken = _broken(case.get("broken"))
    saved = owner.__dict__[name]
    if broken is not None:
        setattr(owner, name, broken)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            ids, mask, new = inputs["input_ids"], inputs["attention_mask"], NEW
            if case.get("rows"):
                nxt = kvpolicy.prefill(model, ids, mask, cache, rows=case["rows"]).argmax(-1, keepdim=True)
                ids, mask, new = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1), NEW - 1
            out = model.generate(input_ids=ids, attention_mask=mask, **{arg: cache}, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=0, **sampling)
    except (kvpolicy.CacheMisuseError, kvpolicy.UnsupportedModelError) as err:
        return {"error": str(err), "tokens": torch.zeros(0), "kept": []}
    finally:
        setattr(owner, name, saved)
    tokens = out[:, inputs["input_ids"].shape[1] :]
    kept = [cache.kept_positions(i).clone() for i in range(len(cache.layers))]
    return {"tokens": tokens, "kept": kept, "frozen": cache.is_frozen(),
            "graphs": counters["stats"]["unique_graphs"] - graphs}


def check_mean_over_heads(parallel) -> bool:
    """The reduction alone: ranks' slices of one ``[B, H, L]`` tensor (with ties) averaged across ranks
    equal, bit for bit, the one-process mean of the whole tensor, on every rank."""
    gen = torch.Generator().manual_seed(3)
    full = torch.rand(3, parallel.total, 50, generator=gen) ** 3  # a wide range of magnitudes
    full[:, :, 10:20] = 0.25  # exact ties
    mine = full[:, parallel.offset : parallel.offset + parallel.local]
    return torch.equal(parallel.mean_over_heads(mine), full.mean(dim=1, keepdim=True))


def gather_layer(local: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """This rank's kept positions ``[B, H here, L]`` and the other ranks' (consecutive KV heads) as one
    layer, and whether every rank's layer is as wide: a narrower one is padded with empty slots (-1) so
    that a width mismatch fails the comparison rather than the gather."""
    import torch.distributed as dist

    world = dist.get_world_size()
    widths = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(widths, torch.tensor([local.shape[2]]))
    width = max(int(w) for w in widths)
    padded = torch.nn.functional.pad(local, (0, width - local.shape[2]), value=-1).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts, dim=1), len({int(w) for w in widths}) == 1


def main(model_dir: str, out_file: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from kvpolicy.core import parallel

    torch.set_num_threads(1)
    logging.disable_progress_bar()
    dist.init_process_group("gloo")  # transformers takes the initialised group
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                 **parallel.from_pretrained_kwargs()).eval()
    counter = CollectiveCounter()
    results: dict[str, Any] = {"world": dist.get_world_size()}
    for case in cases():
        res = run_case(model, case)
        res["collectives"] = counter.take()
        layers = [gather_layer(local) for local in res["kept"]]
        res["kept"] = [kept for kept, _ in layers]
        res["widths_agree"] = all(agree for _, agree in layers)
        if "error" in res:
            results[case["name"]] = res
            continue
        tokens = [torch.empty_like(res["tokens"]) for _ in range(dist.get_world_size())]
        dist.all_gather(tokens, res["tokens"].contiguous())
        res["ranks_agree"] = all(torch.equal(t, tokens[0]) for t in tokens)
        results[case["name"]] = res
    cache = kvpolicy.make_cache("pyramidinfer", **SETTINGS["pyramidinfer"])
    kvpolicy.prefill(model, *batch(model.config.vocab_size).values(), cache)
    layer_parallel = cache.binding.parallel
    results["parallel"] = None if layer_parallel is None else dict(
        size=layer_parallel.size, local=layer_parallel.local, total=layer_parallel.total, rank=layer_parallel.rank)
    results["heads_per_rank"] = cache.layers[0].keys.shape[1]
    exact = torch.tensor([int(check_mean_over_heads(layer_parallel))])
    dist.all_reduce(exact, op=dist.ReduceOp.MIN)  # on every rank
    results["mean_over_heads_exact"] = bool(exact.item())
    if dist.get_rank() == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
