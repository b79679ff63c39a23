"""benchmarks/kvpress_compare.py without kvpress or a model: argument parsing and the tables."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("kvpress_compare", ROOT / "benchmarks" / "kvpress_compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # must not import kvpress
    yield module
    sys.modules.pop(spec.name, None)


def _row(library, method, ratio, ppl_ratio, needle, agreement, reduction):
    return {"library": library, "method": method, "ratio": ratio, "kv_reduction": reduction,
            "kv_reduction_prefill": reduction, "prefill_s": 1.0, "ppl": 30.0 * ppl_ratio, "ppl_ratio": ppl_ratio,
            "needle_accuracy": needle, "agreement": agreement, "agreement_prefix": agreement}


def test_arguments(script):
    args = script.parse_args(["--ratios", "0.2,0.5", "--presses", "snapkv,knorm", "--tasks", "ppl,needle"])
    assert args.ratio_list == [0.2, 0.5]
    assert args.press_list == ["snapkv", "knorm"] and args.task_list == ["ppl", "needle"]
    assert args.sizes == "sweep" and "full" in args.policy_list
    with pytest.raises(SystemExit):
        script.parse_args(["--presses", "nosuchpress"])
    with pytest.raises(SystemExit):
        script.parse_args(["--presses", "observed_attention"])


def test_kvpolicy_specs(script):
    specs = script.kvpolicy_specs(["snapkv", "streamingllm_prefill"], [0.2, 0.4])
    assert [s.label for s in specs] == ["full", "snapkv@0.2", "snapkv@0.4", "streamingllm_prefill@0.2",
                                        "streamingllm_prefill@0.4"]
    assert specs[-1].settings == {"compress": "prefill", "compression_ratio": 0.4}
    assert [script.method_of(s) for s in specs][-1] == "streamingllm_prefill"


def test_report(script):
    rows = [_row("kvpolicy", "full", None, 1.0, 1.0, 1.0, 0.0),
            _row("kvpolicy", "snapkv", 0.2, 0.99, 1.0, 0.78, 0.196),
            _row("kvpress", "DynamicCache", None, 1.0, 1.0, 1.0, 0.0),
            _row("kvpress", "SnapKVPress", 0.2, 1.02, 0.75, 0.5, 0.196),
            _row("kvpress", "KnormPress", 0.2, 1.1, 0.25, 0.1, 0.196)]
    data = {"environment": {"command": "python benchmarks/kvpress_compare.py", "kvpolicy": "0", "kvpress": "0.5.5",
                            "transformers": "5.2.0", "torch": "2", "python": "3.11", "cpu": "cpu", "cpus": 2,
                            "torch_threads": 1},
            "sizes": "sweep", "tasks": ["ppl", "needle", "agreement"], "wall_s": 1.0,
            "skipped": {"tova": "RuntimeError: x"}, "rows": rows}
    text = script.markdown_report(data)
    assert "| snapkv / SnapKVPress | 0.990 / 1.020 |" in text
    assert "| snapkv / SnapKVPress | 100% / 75% |" in text
    assert "| pyramidkv / PyramidKVPress | - |" in text
    assert "| kvpress | KnormPress | 0.2 | 19.6% |" in text
    assert "`tova`: RuntimeError: x" in text


def test_results_meta(script):
    """The JSON carries the run's meta block beside the environment the report reads (kvpress not needed)."""
    argv = ["benchmarks/kvpress_compare.py", "--ratios", "0.2", "--presses", "snapkv", "--tasks", "ppl"]
    args = script.parse_args(argv[1:])
    rows = [_row("kvpolicy", "full", None, 1.0, 1.0, 1.0, 0.0)]
    data = script.results_data(args, argv, rows, {}, 3.0)
    meta = data["meta"]
    for key in ("command", "argv", "commit", "dirty", "versions", "machine", "date"):
        assert key in meta, key
    assert meta["argv"] == argv and meta["command"].endswith("python benchmarks/kvpress_compare.py --ratios 0.2 "
                                                              "--presses snapkv --tasks ppl")
    assert data["environment"]["command"] == meta["command"] and data["rows"] == rows
    assert data["tasks"] == ["ppl"] and data["ratios"] == [0.2] and data["sizes"] == "sweep"
    text = script.markdown_report(data)
    assert ("Commit `" in text) == (meta["commit"] is not None)
