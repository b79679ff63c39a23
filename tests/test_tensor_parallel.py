"""kvpolicy under transformers' tensor parallelism: 2 processes, gloo, a tiny float32 GQA model.

One launch of ``tests/tp_worker.py`` under ``torch.distributed.run`` runs every case (each built-in
policy through ``generate``, and the variants: per-KV-head PyramidInfer, prune-hidden prefill, the
frozen decode path, row-chunked prefill, top-p sampling); meanwhile this process runs the same cases
on the same weights alone. Under parallelism each rank holds half the KV heads; the tokens must equal
one process's, and each layer's kept positions, the ranks' heads put together, too. Only the
policies that merge heads into one score per slot may call a collective.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tp_worker
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import kvpolicy

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# GQA (8 query / 4 KV heads: 2 KV heads per rank); the vocabulary divides by the ranks (transformers
# 5.17 shards lm_head's output and gathers it)
CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(results of the 2-process run, results of one process), case by case."""
    path = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path / "model")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = path / "tp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(ROOT / "tests" / "tp_worker.py"), str(path / "model"), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    assert got["ranks_agree"]
    assert torch.equal(got["tokens"], want["tokens"]), (got["tokens"], want["tokens"])
    assert len(got["kept"]) == len(want["kept"])
    for layer, (g, w) in enumerate(zip(got["kept"], want["kept"])):
        assert torch.equal(g, w), f"layer {layer}: kept positions differ under tensor parallelism"
    assert got["frozen"] == want["frozen"]
    if not name.startswith("full"):  # the case really evicts (else equality would prove little)
        seen = tp_worker.LENGTHS[0] + tp_worker.NEW - 1
        assert min(int((w[0] >= 0).sum(-1).max()) for w in want["kept"]) < seen


@pytest.mark.parametrize("name", CASES)
def test_only_head_merging_policies_communicate(runs, name):
    parallel, _ = runs
    calls = parallel[name]["collectives"]
    if name.split("-")[0] in tp_worker.SHARED_SCORES and "kv_head" not in name:
        assert calls > 0
    else:
        assert calls == 0, f"{name} made {calls} collective calls; a per-KV-head policy needs none"


def test_a_missing_reduction_is_seen(runs):
    """Rank-local head means (no reduction) keep other tokens than one process: the comparison above
    would fail without the reduction."""
    parallel, alone = runs
    got, want = parallel["pyramidinfer-broken"], alone["pyramidinfer"]
    assert any(not torch.equal(g, w) for g, w in zip(got["kept"], want["kept"]))


def test_scores_merged_without_the_reduction_are_refused(runs):
    """A policy that averages its heads itself (``scores.mean(dim=1)``) would keep other tokens on each
    rank: under tensor parallelism the cache raises, naming the fix; alone it runs."""
    parallel, alone = runs
    assert "view.mean_over_heads(scores)" in parallel["pyramidinfer-unmerged"]["error"]
    assert "error" not in alone["pyramidinfer-unmerged"]
