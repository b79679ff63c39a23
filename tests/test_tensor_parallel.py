"""kvpolicy under transformers' tensor parallelism: 2 processes, gloo, a tiny float32 GQA model.

One launch of ``tests/tp_worker.py`` under ``torch.distributed.run`` runs every case (each built-in
policy through ``generate``, and the variants: per-KV-head PyramidInfer, prune-hidden prefill, the
frozen decode path, eager and compiled, row-chunked prefill, top-p sampling, Ada-KV's head-adaptive
split, KVzip's three allocations); meanwhile this process runs the same cases on the same weights
alone. Under parallelism each rank holds half the KV heads; the tokens must equal one process's, and
each layer's kept positions, the ranks' heads put together, too (shapes included: a layer is as wide as
its fullest head over all ranks). Only the policies that merge heads into one score per slot, and the
selections that rank slots across heads, may call a collective.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tp_worker
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import kvpolicy

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.tensor_parallel]

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# GQA (8 query / 4 KV heads: 2 KV heads per rank); the vocabulary divides by the ranks (transformers
# 5.17 shards lm_head's output and gathers it)
CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
            str(ROOT / script), *args]


def worker_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(results of the 2-process run, results of one process), case by case."""
    path = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path / "model")
    out = path / "tp.pt"
    cmd = torchrun("tests/tp_worker.py", str(path / "model"), str(out))
    proc = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the one-process reference, while the ranks run
        model = AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
        alone = {case["name"]: tp_worker.run_case(model, case) for case in tp_worker.cases()}
        log, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-6000:]
    return torch.load(out), alone


CASES = [case["name"] for case in tp_worker.cases() if not case.get("broken")]


def test_every_builtin_policy_is_a_case():
    assert set(kvpolicy.available_policies()) <= set(CASES)


def test_each_rank_holds_its_share_of_the_kv_heads(runs):
    parallel, _ = runs
    assert parallel["parallel"]["size"] == WORLD
    assert parallel["parallel"]["total"] == CONFIG["num_key_value_heads"]
    assert parallel["heads_per_rank"] == parallel["parallel"]["local"] == CONFIG["num_key_value_heads"] // WORLD


def test_score_reduction_is_bitwise_the_one_process_mean(runs):
    assert runs[0]["mean_over_heads_exact"]


@pytest.mark.parametrize("name", CASES)
def test_tokens_and_kept_positions_equal_one_process(runs, name):
    parallel, alone = runs
    got, want = parallel[name], alone[name]
    assert "error" not in want and "error" not in got, (want.get("error"), got.get("error"))
    assert got["ranks_agree"] and got["widths_agree"]
    assert torch.equal(got["tokens"], want["tokens"]), (got["tokens"], want["tokens"])
    assert len(got["kept"]) == len(want["kept"])
    for layer, (g, w) in enumerate(zip(got["kept"], want["kept"])):
        assert torch.equal(g, w), f"layer {layer}: kept positions differ under tensor parallelism"
    assert got["frozen"] == want["frozen"]
    if name.endswith("-compiled"):  # the decode step ran as a compiled graph, in either run
        assert got["graphs"] >= 1 and want["graphs"] >= 1
    if not name.startswith("full"):  # the case really evicts (else equality would prove little)
        seen = tp_worker.LENGTHS[0] + tp_worker.NEW - 1
        assert min(int((w[0] >= 0).sum(-1).max()) for w in want["kept"]) < seen, (
            f"{name} evicted nothing: give it settings under which it compresses in tests/tp_worker.SETTINGS")


@pytest.mark.parametrize("name", CASES)
def test_only_head_merging_policies_communicate(runs, name):
    parallel, _ = runs
    calls = parallel[name]["collectives"]
    if (name.split("-")[0] in tp_worker.SHARED_SCORES and "kv_head" not in name) or name in tp_worker.CROSS_HEAD:
        assert calls > 0
    else:  # kvzip-uniform included: each head keeps its own best, no ranking across heads
        assert calls == 0, f"{name} made {calls} collective calls; a per-KV-head policy needs none"


def test_a_missing_reduction_is_seen(runs):
    """Rank-local head means (no reduction) keep other tokens than one process: the comparison above
    would fail without the reduction."""
    parallel, alone = runs
    got, want = parallel["pyramidinfer-broken"], alone["pyramidinfer"]
    assert any(not torch.equal(g, w) for g, w in zip(got["kept"], want["kept"]))


@pytest.mark.parametrize("broken, reference",
                         [("kvzip-broken", "kvzip"), ("snapkv-adaptive-broken", "snapkv-adaptive")])
def test_a_missing_gather_is_seen(runs, broken, reference):
    """A ranking across heads over this rank's heads alone (KVzip's over layers and heads with its scores
    not gathered; Ada-KV's split selected on the rank, nothing gathered) keeps other tokens, or other
    widths, than one process: the comparison above would fail without the gathers."""
    parallel, alone = runs
    got, want = parallel[broken], alone[reference]
    assert "error" not in got, got.get("error")
    assert not got["widths_agree"] or any(not torch.equal(g, w) for g, w in zip(got["kept"], want["kept"]))


def test_scores_merged_without_the_reduction_are_refused(runs):
    """A policy that averages its heads itself (``scores.mean(dim=1)``) would keep other tokens on each
    rank: under tensor parallelism the cache raises, naming the fix; alone it runs."""
    parallel, alone = runs
    assert "view.mean_over_heads(scores)" in parallel["pyramidinfer-unmerged"]["error"]
    assert "error" not in alone["pyramidinfer-unmerged"]


def test_throughput_tp_dry_run(tmp_path):
    """benchmarks/throughput_tp.py on the tiny shape (2 ranks, gloo): every rank shards the model (each
    holds about half the weights), rank 0 alone prints and writes, the KV bytes are per GPU, and the
    score reductions are counted where heads merge only."""
    out = tmp_path / "tp.json"
    policies = ["hf-dynamic", "hf-static", "pyramidinfer-floor-generate", "h2o-budget-generate", "tova-budget-generate"]
    prompt, new = 100, 18  # past PyramidInfer's 64-token floor and its first decode group
    proc = subprocess.run(
        torchrun("benchmarks/throughput_tp.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                 "--prompt-lens", str(prompt), "--new-tokens", str(new), "--batch-sizes", "2", "--no-compile",
                 "--profile-batch", "2", "--budget", "48", "--warmup-tokens", "4", "--hf-static-steps", "8",
                 "--policies", ",".join(policies), "--json", str(out)),
        env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    data = json.loads(out.read_text())
    meta, rows = data["meta"], {r["policy"]: r for r in data["rows"]}
    assert list(rows) == policies
    assert meta["tp_size"] == WORLD and "--budget 48" in meta["command"]
    assert meta["params_per_rank"] < 0.55 * meta["params"]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == len(policies)  # rank 0 prints, the other rank is silent
    # the tiny shape: 4 layers, 2 KV heads of 16 dims, one per rank, float32; transformers' cache holds
    # every token the generation fed back
    per_gpu_token = 4 * 1 * 16 * 4 * 2
    assert rows["hf-dynamic"]["kv_bytes_per_seq"] == (prompt + new - 1) * per_gpu_token
    # at most the budget and the tokens of one eviction period
    assert rows["h2o-budget-generate"]["kv_bytes_used_per_seq"] <= (48 + 15) * per_gpu_token
    assert rows["h2o-budget-generate"]["reduction_calls"] == {}
    tova, pyramid = rows["tova-budget-generate"], rows["pyramidinfer-floor-generate"]
    # the timed call alone: TOVA at each layer of the prompt's forward and of the new - 1 decode forwards
    assert tova["reduction_calls"] == {"prefill": 4, "decode": 4 * (new - 1)}
    assert tova["reduction_scope"] == "timed call" and pyramid["reduction_calls"]["prefill"] > 0
    assert tova["reduction_ms_per_step"] > 0 and pyramid["reduction_prefill_ms"] > 0  # --profile-batch 2
    assert rows["hf-static"]["projected_from_steps"] == 8  # timed over 8 steps of a cache sized for all 18
    for row in rows.values():
        assert row["tp_size"] == WORLD and row["generated_tokens_per_s"] > 0


def test_the_docs_example_gives_one_process_tokens(tmp_path, capsys):
    """docs/tensor-parallel.md's runnable example, under torchrun (2 ranks) and alone: the same tokens,
    and each rank holds half the KV heads and half the bytes."""
    text = (ROOT / "docs" / "tensor-parallel.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "LlamaConfig(" in b)
    script = tmp_path / "tp_example.py"
    script.write_text(code)
    proc = subprocess.run(torchrun(str(script)), env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    exec(compile(code, "<doc example>", "exec"), {})
    alone = capsys.readouterr().out.splitlines()
    lines = proc.stdout.splitlines()
    assert [t for t in lines if t.startswith("tokens")] == [alone[0]]
    ranks = sorted(t for t in lines if t.startswith("rank"))
    assert [t.split(":")[0] for t in ranks] == ["rank 0", "rank 1"]

    def kept(line: str) -> str:
        return re.search(r"per layer (\[.*?\])", line).group(1)

    def kv_bytes(line: str) -> int:
        return int(re.search(r"(\d+) bytes", line).group(1))

    for t in ranks:
        assert "2 of 4 KV heads" in t and kept(t) == kept(alone[1])
        assert kv_bytes(t) * WORLD == kv_bytes(alone[1])
