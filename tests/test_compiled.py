"""The compiled decode step as it ships: ``generate_static(compile=True)``.

On CPU that is ``torch.compile(fullgraph=True)`` with inductor, the default backend (generated C++
kernels, no CUDA graphs). The other static-path tests run the step eagerly (``compile=False``) or
trace it with ``backend="eager"``; only these check what inductor makes of the step's in-place
writes (key/value/position at the slot tensor, the query ring, the slot and position bumps) and of
the eager re-compression between compiled steps: tokens and every step's logits against eager
``generate`` with the same policy and against the uncompiled static step, and the kept positions.

Inductor compiles slowly on a small CPU, so one 2-layer model and one batch serve every case, and
each policy compiles once (its buffers have other shapes than the other policy's: the second
compile is the dynamic-shape graph that later calls with new shapes use). The GPU counterpart
(CUDA graphs, a larger model, bfloat16) is ``benchmarks/compiled_path_check.py``, dry-run at the
end of this file.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from models import batch, tiny_model
from test_static_decode import PYRAMID
from torch._dynamo.utils import counters

import kvpolicy
from kvpolicy.generation import generate_static

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2
NEW = 16
LENGTHS = [40, 33, 37]
#: full, and the policy that exercises most of the static path: it compresses the prompt and, every
#: 4 tokens, the generated ones, scored by the queries of the step's ring. (snapkv and streamingllm:
#: static step uncompiled in test_static_decode.py, compiled on the GPU by the check script; each
#: more policy here costs another compile, 15-30 s on 2 CPU cores.)
CASES: dict[str, dict[str, Any]] = {"full": {}, "pyramidinfer": PYRAMID}

#: compiled step against eager ``generate`` and against the uncompiled static step (float32). Inductor
#: fuses and reorders reductions (norms, softmax) and the prompt is prefilled in row chunks, so not
#: bitwise; worst measured difference 2.1e-7 (over both comparisons, both policies); bound with
#: headroom. A skipped query-ring write moved them by 7e-3 to 1.3e-2 (test_static_decode.py, no token changed).
COMPILED_TOL = 1e-6


@dataclass
class Run:
    eager: Any  # generate's output (sequences, logits)
    eager_cache: kvpolicy.PolicyCache
    uncompiled: Any  # StaticGeneration, compile=False
    compiled: Any  # StaticGeneration, compile=True
    graphs: int  # graphs dynamo compiled for this policy's first call
    inductor_compiles: int  # of which inductor compiled (or loaded from its cache)


def inductor_compiles() -> int:
    """Graphs inductor compiled or loaded from its cache, whichever counter this torch keeps."""
    c = counters["inductor"]
    return c["fxgraph_cache_miss"] + c["fxgraph_cache_hit"] + c["fxgraph_cache_bypass"]


def eager_generate(model, inputs, cache):
    with torch.no_grad():
        return model.generate(**inputs, **{kvpolicy.cache_argument(model): cache}, max_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                              return_dict_in_generate=True)


def static_generate(model, inputs, policy, compile_step):
    return generate_static(model, **inputs, policy=policy, max_new_tokens=NEW, prefill_batch_size=2,
                           compile=compile_step, output_logits=True, **CASES[policy])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "sdpa", layers=LAYERS)


@pytest.fixture(scope="module")
def runs(model) -> dict[str, Run]:
    """Every policy once through each path; the compiles are shared by the tests below."""
    torch._dynamo.reset()  # no graphs of other tests' compiles: count ours, and stay under the recompile limit
    counters.clear()
    inputs = batch(LENGTHS, seed=3)
    out = {}
    for policy in CASES:
        graphs, inductor = counters["stats"]["unique_graphs"], inductor_compiles()
        compiled = static_generate(model, inputs, policy, True)
        graphs, inductor = counters["stats"]["unique_graphs"] - graphs, inductor_compiles() - inductor
        cache = kvpolicy.make_cache(policy, **CASES[policy])
        out[policy] = Run(eager_generate(model, inputs, cache), cache, static_generate(model, inputs, policy, False),
                          compiled, graphs, inductor)
    yield out
    torch._dynamo.reset()


def assert_close_logits(expected, got):
    assert got is not None and len(got) == len(expected) == NEW
    for step, (want, have) in enumerate(zip(expected, got)):
        diff = (want - have).abs().max().item()
        assert diff <= COMPILED_TOL, f"step {step}: logits differ by {diff:.3g}"


def assert_same_kept_positions(reference: kvpolicy.PolicyCache, static: kvpolicy.PolicyCache):
    assert static.valid_tokens_per_layer() == reference.valid_tokens_per_layer()
    for layer in range(len(reference.layers)):
        kept, held = reference.kept_positions(layer), static.kept_positions(layer)
        assert torch.equal(held[..., : kept.shape[-1]], kept)
        assert (held[..., kept.shape[-1] :] == -1).all()


@pytest.mark.parametrize("policy", list(CASES))
def test_each_policy_really_ran_a_graph_compiled_by_inductor(runs, policy):
    """Not silently eager: the first call with this policy's buffer shapes traced the step into a graph
    and inductor (not the eager backend) compiled it. With ``fullgraph=True`` dynamo raises on a graph
    break and at the recompile limit instead of falling back to eager Python."""
    earlier = list(CASES)[: list(CASES).index(policy)]
    shapes = [layer.keys.shape for layer in runs[policy].compiled.cache.layers]
    assert all(shapes != [layer.keys.shape for layer in runs[p].compiled.cache.layers] for p in earlier)
    assert runs[policy].graphs >= 1
    assert runs[policy].inductor_compiles >= 1


@pytest.mark.parametrize("policy", list(CASES))
def test_compiled_step_matches_eager_generate(runs, policy):
    run = runs[policy]
    assert torch.equal(run.compiled.sequences, run.eager.sequences)
    assert_close_logits(run.eager.logits, run.compiled.logits)
    assert_same_kept_positions(run.eager_cache, run.compiled.cache)
    if policy != "full":  # the policy really evicted, so the eager re-compression between steps ran
        seen = LAYERS * sum(run.eager_cache.seen_tokens())
        assert sum(map(sum, run.compiled.cache.valid_tokens_per_layer())) < seen


@pytest.mark.parametrize("policy", list(CASES))
def test_compiled_step_matches_the_uncompiled_static_step(runs, policy):
    run = runs[policy]
    assert torch.equal(run.compiled.sequences, run.uncompiled.sequences)
    assert_close_logits(run.uncompiled.logits, run.compiled.logits)
    assert_same_kept_positions(run.uncompiled.cache, run.compiled.cache)


def test_a_second_call_replays_the_compiled_graph(runs, model):
    """Same shapes, other prompts: no new graph, and still generate's tokens."""
    graphs = counters["stats"]["unique_graphs"]
    inputs = batch(LENGTHS, seed=4)
    out = static_generate(model, inputs, "pyramidinfer", True)
    assert counters["stats"]["unique_graphs"] == graphs
    expected = eager_generate(model, inputs, kvpolicy.make_cache("pyramidinfer", **PYRAMID))
    assert torch.equal(out.sequences, expected.sequences)
    assert_close_logits(expected.logits, out.logits)


def test_compiled_path_check_dry_run(tmp_path):
    """The GPU check script (benchmarks/compiled_path_check.py) on CPU, static step uncompiled, so it cannot rot."""
    spec = importlib.util.spec_from_file_location("compiled_path_check", ROOT / "benchmarks" / "compiled_path_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    code = module.main(["--tiny", "--device", "cpu", "--no-compile", "--steps", "4", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["rows"]] == [
        "full", "pyramidinfer_54_floor", "snapkv-0.5", "streamingllm-0.5", "h2o-0.5"
    ]
    for row in data["rows"]:
        for path in ("", "gen_"):  # generate_static, and plain generate over the frozen layers
            assert row[path + "tokens_equal"] and row[path + "same_kept_positions"], (row["policy"], path)
            assert row[path + "max_logit_diff"] <= COMPILED_TOL and len(row[path + "logit_diff_per_step"]) == 4
        assert row["gen_frozen"]
    assert all(r["kv_fraction_kept"] < 1 for r in data["rows"][1:])  # the policies compressed
    meta = data["meta"]
    assert meta["versions"]["torch"] and meta["versions"]["transformers"] and "commit" in meta
    assert meta["steps"] == 4 and meta["compile"] is False and meta["dtype"] == "float32"
