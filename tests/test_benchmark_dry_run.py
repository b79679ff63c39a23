"""The GPU throughput script's CPU dry run, so the benchmark cannot rot between GPU sessions.

The prompts (200 tokens) and generations (24 tokens) are long enough for every policy to
compress: above PyramidInfer's 64-token context floor and past its first 16-token decode group.
Each compressed row must hold fewer KV bytes than ``full``'s, and ``full``'s must be the KV size
of the tiny shape worked out by hand.
"""

import importlib.util
import json
from pathlib import Path

import pytest

import kvpolicy

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 200, 24
#: the tiny shape (throughput.SHAPES["tiny"]): 4 layers, 2 KV heads of 64 / 4 = 16 dims, float32;
#: keys and values of one token in every layer
BYTES_PER_TOKEN = 4 * 2 * 2 * (64 // 4) * 4
#: a generation of NEW tokens feeds the prompt and NEW - 1 of them back (the last one's keys are
#: never computed)
FULL_TOKENS = PROMPT + NEW - 1
META_KEYS = ("command", "argv", "commit", "dirty", "versions", "machine", "date")
#: the keys throughput.py always wrote, which report_throughput.py reads (old files have only these)
LEGACY_META_KEYS = ("command", "device", "torch", "transformers", "shape", "dtype")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def throughput_script():
    return _script("throughput")


def test_throughput_script_dry_run(tmp_path):
    module = throughput_script()
    out = tmp_path / "tp.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-lens", str(PROMPT),
            "--new-tokens", str(NEW), "--batch-sizes", "2",
            "--policies", "hf-dynamic,full,pyramidinfer,pyramidinfer-54,h2o",
            "--json", str(out)]
    assert module.main(argv) == 0
    data = json.loads(out.read_text())
    rows = {r["policy"]: r for r in data["rows"]}
    assert list(rows) == ["hf-dynamic", "full", "pyramidinfer", "pyramidinfer-54", "h2o"]
    for row in rows.values():
        assert row["generated_tokens_per_s"] > 0 and row["decode_step_ms"] > 0
        assert row["prompt"] == PROMPT and row["new_tokens"] == NEW and row["batch"] == 2

    # full keeps every token: the slots in use are the hand-computed KV size, as transformers' own cache
    full = rows["full"]
    assert full["kv_bytes_used_per_seq"] == FULL_TOKENS * BYTES_PER_TOKEN
    dynamic = rows["hf-dynamic"]
    assert dynamic["kv_bytes_per_seq"] == dynamic["kv_bytes_used_per_seq"] == FULL_TOKENS * BYTES_PER_TOKEN
    # kv_bytes_per_seq is the buffers' capacity: the slots in use plus at most one headroom per layer
    headroom = kvpolicy.make_cache("full").policy.headroom(0)
    assert FULL_TOKENS * BYTES_PER_TOKEN <= full["kv_bytes_per_seq"] <= (FULL_TOKENS + headroom) * BYTES_PER_TOKEN

    for name in ("pyramidinfer", "pyramidinfer-54", "h2o"):
        row = rows[name]
        assert row["kv_bytes_used_per_seq"] < full["kv_bytes_used_per_seq"], (name, row)
        assert row["kv_bytes_per_seq"] <= full["kv_bytes_per_seq"], (name, row)
    # these remove more than a buffer's headroom, so their buffers shrink too (the reference preset
    # removes ~5% of a 200-token prompt on 4 layers: its buffers are compacted in place and keep
    # full's capacity)
    for name in ("pyramidinfer-54", "h2o"):
        assert rows[name]["kv_bytes_per_seq"] < full["kv_bytes_per_seq"], (name, rows[name])
    # h2o at 0.54, evicting every 16 decode steps: it keeps the budget of the tokens seen
    # (seen - int(0.54 * seen)) plus at most 15 tokens added since its last eviction
    budget = FULL_TOKENS - int(FULL_TOKENS * 0.54)
    assert budget * BYTES_PER_TOKEN <= rows["h2o"]["kv_bytes_used_per_seq"] <= (budget + 15) * BYTES_PER_TOKEN

    meta = data["meta"]
    for key in META_KEYS + LEGACY_META_KEYS:
        assert key in meta, key
    assert meta["argv"] == ["benchmarks/throughput.py", *argv]
    assert meta["command"].startswith("python benchmarks/throughput.py ")
    assert meta["shape"] == "tiny" and meta["dtype"] == "float32" and meta["transformers"]

    # the report reads this file and a recorded one from before the meta block alike
    report = _script("report_throughput")
    old = ROOT / "docs" / "benchmarks" / "raw" / "run_e1.json"
    (old_meta, old_rows), (new_meta, new_rows) = report.load([old, out])
    assert "commit" not in old_meta and report.table(old_rows).count("\n") == len(old_rows) + 2
    assert report.run_header(old.name, old_meta).startswith("Run `run_e1.json` on NVIDIA H100")
    header = report.run_header(out.name, new_meta)
    assert f"commit `{meta['commit'][:12]}`" in header if meta["commit"] else "commit" not in header
    assert "| h2o | 2 |" in report.table(new_rows)


def test_throughput_script_dry_run_static_policies(tmp_path):
    module = throughput_script()
    out = tmp_path / "tp.json"
    code = module.main(
        ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-lens", str(PROMPT),
         "--new-tokens", str(NEW), "--batch-sizes", "3", "--profile-batch", "3", "--prefill-chunk", "2", "--no-compile",
         "--policies", "full-static,pyramidinfer-54-static,pyramidinfer-54-prune-static", "--json", str(out)]
    )
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["full-static", "pyramidinfer-54-static", "pyramidinfer-54-prune-static"]
    for row in rows:
        assert row["generated_tokens_per_s"] > 0 and row["prefill_chunk"] == 2
        assert row["profile_step_ms"] > 0 and row["profile_maintain_ms"] >= 0
    full, *compressed = rows
    # the static buffers are sized once for the whole generation: full's hold exactly every token
    assert full["kv_bytes_per_seq"] == full["kv_bytes_used_per_seq"] == FULL_TOKENS * BYTES_PER_TOKEN
    for row in compressed:
        assert row["kv_bytes_used_per_seq"] < full["kv_bytes_used_per_seq"], row
        assert row["kv_bytes_per_seq"] < full["kv_bytes_per_seq"], row


def test_throughput_script_dry_run_kvpress(tmp_path):
    """kvpress side by side (its environment only: kvpress needs transformers < 5.3)."""
    import pytest

    pytest.importorskip("kvpress")
    module = throughput_script()
    out = tmp_path / "tp.json"
    code = module.main(
        ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-lens", "80", "--new-tokens", "4",
         "--batch-sizes", "2", "--press-ratio", "0.5", "--policies", "hf-dynamic,kvpress-snapkv", "--json", str(out)]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["meta"]["kvpress"]  # the run names the kvpress version it measured
    dynamic, press = data["rows"]
    assert press["policy"] == "kvpress-snapkv" and press["generated_tokens_per_s"] > 0
    # the press halved the prompt's 80 tokens per layer (SnapKV's window is 64); the 3 generated after
    # it stay (the last token's keys are never computed)
    assert press["kv_bytes_per_seq"] == dynamic["kv_bytes_per_seq"] * (40 + 3) / (80 + 3)


def test_prefill_overhead_dry_run_meta(tmp_path):
    """benchmarks/prefill_overhead.py on the tiny shape: one short forward per cache, and the meta block."""
    out = tmp_path / "prefill.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--rows", "2", "--prompt", "16", "--reps", "1",
            "--chunks", "0", "--policies", "dynamic,full", "--label", "dry", "--json", str(out)]
    assert _script("prefill_overhead").main(argv) == 0
    data = json.loads(out.read_text())
    assert [r["cache"] for r in data["rows"]] == ["dynamic", "full"] and data["rows"][1]["forward_ms"] > 0
    meta = data["meta"]
    for key in META_KEYS + ("label", "kvpolicy_path", "device", "torch", "transformers"):
        assert key in meta, key
    assert meta["argv"] == ["benchmarks/prefill_overhead.py", *argv] and meta["label"] == "dry"


def test_prune_prefill_dry_run(tmp_path):
    """benchmarks/prune_prefill.py on the tiny shape at 8 layers: the computed tokens per layer follow each mode,
    the KV is the same in both prune-hidden variants and cache-only, and the meta block."""
    out = tmp_path / "prune.json"
    variants = 'pyramidinfer_54_floor,pyramidinfer_54_floor:{"prefill_mode":"prune_hidden"},pyramidinfer_54_floor_prune'
    argv = ["--shape", "tiny", "--layers", "8", "--device", "cpu", "--prompt", "300", "--rows", "2", "--reps", "1",
            "--threads", "1", "--variants", variants, "--json", str(out)]
    assert _script("prune_prefill").main(argv) == 0
    data = json.loads(out.read_text())
    only, start0, floor_prune = data["rows"]
    assert only["computed_tokens_per_layer"] == [300] * 8 and only["x_baseline"] == 1.0
    assert only["kv_tokens_per_layer"] == start0["kv_tokens_per_layer"] == floor_prune["kv_tokens_per_layer"]
    kv = only["kv_tokens_per_layer"]
    assert start0["computed_tokens_per_layer"] == [300] + kv[:-1]  # layer l + 1 computes what layer l kept
    first_cut = int(0.47 * 8)
    assert floor_prune["computed_tokens_per_layer"] == [300] * (first_cut + 1) + kv[first_cut:-1]
    assert start0["computed_share"] < floor_prune["computed_share"] < 1.0
    assert data["meta"]["argv"] == ["benchmarks/prune_prefill.py", *argv] and data["meta"]["shape"] == "tiny"


def test_needle_probe_results_meta():
    """benchmarks/needle_probe.py's file content (the probe itself needs the real model: not run here)."""
    rows = [{"policy": "full", "found": 6, "of": 6}]
    argv = ["--json", "out.json", "full", 'snapkv:{"compression_ratio":0.54}']
    data = _script("needle_probe").results(rows, argv, [1636, 1740], 7)
    meta = data["meta"]
    for key in META_KEYS:
        assert key in meta, key
    assert data["rows"] == rows and meta["prompt_lengths"] == [1636, 1740] and meta["needle_seed"] == 7
    assert meta["argv"] == ["benchmarks/needle_probe.py", *argv]
    assert meta["command"].endswith("""full 'snapkv:{"compression_ratio":0.54}'""")  # pasteable into a shell


def test_plot_batches_draws_every_policy(tmp_path):
    rows = [{"policy": "a", "batch": 8, "generated_tokens_per_s": 10.0},
            {"policy": "a", "batch": 16, "oom": True},
            {"policy": "b", "batch": 8, "generated_tokens_per_s": 12.0}]
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    first.write_text(json.dumps({"meta": {}, "rows": rows}))
    second.write_text(json.dumps({"meta": {}, "rows": [{"policy": "b", "batch": 8, "generated_tokens_per_s": 14.0}]}))
    module = _script("plot_batches")
    assert module.load_rows([first, second])["b"][8]["generated_tokens_per_s"] == 14.0  # the later file wins
    out = tmp_path / "plot.png"
    assert module.main([str(first), str(second), "--out", str(out)]) == 0
    assert out.stat().st_size > 5_000


def test_question_position_report(tmp_path):
    def results(mode, accuracies):
        rows = [{"label": label, "needle_accuracy": acc, "kv_reduction_prefill": 0.5} for label, acc in accuracies]
        path = tmp_path / f"{mode}.json"
        path.write_text(json.dumps({"meta": {"sizes": {"question": mode}}, "rows": rows}))
        return path

    module = _script("report_question_position")
    text = module.table(module.rows_of([results("in_prompt", [("full", 0.8), ("snapkv@0.5", 0.8)])], "in_prompt"),
                        module.rows_of([results("after_context", [("full", 0.8), ("snapkv@0.5", 0.2)])],
                                       "after_context"))
    assert "| `snapkv@0.5` | 50% / 50% | 0.80 | 100% | 0.20 | 25% |" in text
    with pytest.raises(SystemExit, match="in_prompt"):
        module.rows_of([tmp_path / "in_prompt.json"], "after_context")


def test_throughput_script_long_context_dry_run(tmp_path):
    """The long-context settings of issue #16 on the tiny shape: a budget-capped policy holds at most
    its budget whatever the generation's length, the chunked prefill runs compiled, and hf-static's
    projection is its measured prefill plus (new - 1) measured steps."""
    module = throughput_script()
    out = tmp_path / "long.json"
    new, steps = 40, 6
    code = module.main(
        ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-lens", str(PROMPT),
         "--new-tokens", str(new), "--batch-sizes", "2", "--profile-batch", "0", "--prefill-chunk", "1", "--no-compile",
         "--compile-prefill", "--hf-static-steps", str(steps),
         "--policies", "hf-static,streamingllm-1024-static,full-static", "--json", str(out)]
    )
    assert code == 0
    hf, capped, full = json.loads(out.read_text())["rows"]
    assert hf["projected_from_steps"] == steps and "projected_from_steps" not in capped
    total = hf["prefill_s"] + hf["decode_step_ms"] / 1000 * (new - 1)
    assert hf["total_s"] == pytest.approx(total) and hf["generated_tokens_per_s"] == pytest.approx(2 * new / total)
    assert capped["compile_prefill"] is True
    # the prompt (200) plus 39 generated tokens stay under the 1024-slot budget: all held, as full holds them
    assert capped["kv_bytes_used_per_seq"] == full["kv_bytes_used_per_seq"] == (PROMPT + new - 1) * BYTES_PER_TOKEN


def test_prefill_flops_by_hand():
    """prefill_overhead.prefill_flops on the Llama-3-8B shape, the floor the long-context section quotes:
    per layer q/o 4096x4096 each, k/v 4096x1024 each, MLP 3 x 4096x14336 = 218,103,808 weights, x32
    layers = 6.98e9; 2 FLOP per weight per token over 8192 tokens = 1.1433e14; causal attention
    2 products x 2 x 8192^2/2 x 128 x 32 heads x 32 layers = 1.7592e13; total 1.3194e14."""
    from transformers import LlamaConfig

    config = LlamaConfig(**throughput_script().SHAPES["llama3-8b"])
    flops = _script("prefill_overhead").prefill_flops(config, 8192)
    assert flops == 2 * 218_103_808 * 32 * 8192 + 2 * 2 * (8192 * 8192 // 2) * 128 * 32 * 32
    assert flops == pytest.approx(1.3194e14, rel=1e-4)


def test_decode_kernel_report_reads_the_recorded_runs(tmp_path):
    """report_decode_kernel.py over the committed H100 files: one table row per measured shape and dtype, the
    ratios as recorded (not recomputed elsewhere), and a plot."""
    module = _script("report_decode_kernel")
    path = ROOT / "docs/benchmarks/decode_kernel/run2_word_loads.json"
    data = json.loads(path.read_text())
    text = module.tables(path.stem, data)
    assert text.count("| llama") + text.count("| smollm2") == len(data["timings"])
    for row in data["timings"]:
        assert f"**{row['kernel_x_floor']:.2f}**" in text
        assert row["kernel_x_floor"] == pytest.approx(row["kernel_us"] / row["floor_us"])
    out = tmp_path / "k.png"
    module.plot({path.stem: data}, out)
    assert out.stat().st_size > 5_000
