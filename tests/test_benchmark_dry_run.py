"""The GPU throughput script's CPU dry run, so the benchmark cannot rot between GPU sessions."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def throughput_script():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_script_dry_run(tmp_path):
    module = throughput_script()
    out = tmp_path / "tp.json"
    code = module.main(
        ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-lens", "40",
         "--new-tokens", "4", "--batch-sizes", "2", "--policies", "hf-dynamic,full,pyramidinfer,h2o", "--json", str(out)]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert {r["policy"] for r in data["rows"]} == {"hf-dynamic", "full", "pyramidinfer", "h2o"}
    for row in data["rows"]:
        assert row["generated_tokens_per_s"] > 0 and row["decode_step_ms"] > 0
    assert data["meta"]["transformers"]


def test_throughput_script_dry_run_static_policies(tmp_path):
    module = throughput_script()
    out = tmp_path / "tp.json"
    code = module.main(
        ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-lens", "40", "--new-tokens", "4",
         "--batch-sizes", "3", "--profile-batch", "3", "--prefill-chunk", "2", "--no-compile",
         "--policies", "full-static,pyramidinfer-54-static,pyramidinfer-54-prune-static", "--json", str(out)]
    )
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["full-static", "pyramidinfer-54-static", "pyramidinfer-54-prune-static"]
    for row in rows:
        assert row["generated_tokens_per_s"] > 0 and row["prefill_chunk"] == 2
        assert row["profile_step_ms"] > 0 and row["profile_maintain_ms"] >= 0


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
