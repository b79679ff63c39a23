"""benchmarks/kvpress_compare.py: argument parsing and the tables without kvpress or a model; the ruler suite
through the script on a tiny model where kvpress is importable (it needs transformers<5.3)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from test_cli import fake_novels, tiny_model_dir  # noqa: F401 - fixtures: stand-in novels; a tiny Llama with a word-level tokenizer
from test_ruler import prose_file  # noqa: F401 - the fixture: a haystack text file that is not the novels

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
    at_dtypes = script.kvpolicy_specs(["tova"], [0.5], kv_dtypes=("int4",))
    assert [s.label for s in at_dtypes] == ["full", "full+int4", "tova+int4@0.5"]
    assert script.parse_args(["--press-cache", "quanto4", "--presses", "tova"]).press_cache == "quanto4"
    with pytest.raises(SystemExit):
        script.parse_args(["--press-cache", "hqq8"])


def test_tensor_bytes_counts_the_inner_tensors_of_a_packed_tensor(script):
    """optimum-quanto's 4-bit tensors are tensor subclasses made of packed codes, scales and shifts: each inner
    tensor counts (a stand-in subclass here; the real one needs optimum-quanto)."""
    class Packed(torch.Tensor):
        def __tensor_flatten__(self):
            return ["_data", "_scale"], None

    packed = torch.Tensor._make_subclass(Packed, torch.zeros(4, 8))
    packed._data, packed._scale = torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.bfloat16)
    assert script._tensor_bytes(packed) == 16 + 8
    assert script._tensor_bytes(torch.zeros(3, dtype=torch.bfloat16)) == 6


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


# ----------------------------------------------------------------------------- the ruler suite (needs kvpress)
def _kvpress_ok() -> bool:
    try:
        import kvpress  # noqa: F401
    except Exception:  # noqa: BLE001 - kvpress missing or incompatible with this transformers
        return False
    return True


KVPRESS = pytest.mark.skipif(not _kvpress_ok(), reason="kvpress is not importable (needs transformers<5.3)")
#: one press that scores with the question's attention (SnapKV), one that does not (KNorm), and KVzip
RULER_PRESSES = "snapkv,knorm,kvzip"


@pytest.fixture(scope="module")
def wide_model_dir(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """``tiny_model_dir``'s tokenizer on a random Llama with 64-wide heads and one query head per key
    head. kvpress's KVzip masks the keys it evicts with a fake key from a search for a hyperplane that
    every query of the forward lies behind; for a multi-token forward (the question after the context)
    of a random model with 16-wide heads and two query heads per key head, there are more queries than
    dimensions and the search fails (``ValueError: Could not find fake keys``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide_llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_ruler_arguments(script, tmp_path):
    """The suite's flags are kvpolicy compare's; its ratios and presses are the suite's defaults."""
    hay = tmp_path / "hay.txt"
    hay.write_text("The villagers said nothing at all. " * 400)
    args = script.parse_args(["--suite", "ruler", "--context", "256,384", "--samples", "2", "--question",
                              "after-context", "--haystack", str(hay), "--ruler-tasks", "niah_single"])
    assert args.task_list == ["ruler"] and args.ratio_list == [0.25, 0.5, 0.75, 0.9]
    assert "kvzip" in args.press_list and "kvzip_smollm2" in args.policy_list
    sizes = script.input_sizes(args)
    assert sizes.ruler_lengths == (256, 384) and sizes.ruler_samples == 2 and sizes.question == "after_context"
    assert sizes.ruler_tasks == ("niah_single",) and sizes.ruler_haystack == str(hay)
    only = script.parse_args(["--suite", "ruler", "--kvpolicy", "", "--presses", "tova"])
    assert only.policy_list == [] and only.press_list == ["tova"]
    with pytest.raises(SystemExit):  # presses need batch size 1
        script.parse_args(["--suite", "ruler", "--batch-size", "4"])
    assert script.parse_args(["--suite", "ruler", "--presses", "", "--batch-size", "4"]).batch_size == 4
    with pytest.raises(SystemExit):
        script.parse_args(["--suite", "ruler", "--tasks", "ppl"])


def _ruler_run(script, model_dir, hay, out, question, *extra):
    argv = ["--model", str(model_dir), "--suite", "ruler", "--ruler-tasks", "niah_single,niah_multikey",
            "--samples", "1", "--context", "256", "--haystack", str(hay), "--ratios", "0.5", "--threads", "1",
            "--question", question, "--json", str(out), *extra]
    assert script.main(argv) == 0
    return json.loads(out.read_text())


def _samples(row):
    return sorted((s["task"], s["length"], s["index"], s["tokens"], tuple(s["answers"])) for s in row["ruler_samples"])


@KVPRESS
@pytest.mark.parametrize("question", ["in-prompt", "after-context"])
def test_ruler_suite_side_by_side(script, wide_model_dir, prose_file, tmp_path, question, capsys):  # noqa: F811
    """kvpolicy's policies and kvpress's presses run the suite on the same samples, which are the ones
    kvpolicy compare --suite ruler generates from the same flags; a press compresses the prompt in one
    mode, the context alone in the other (the question's tokens all kept)."""
    from kvpolicy.evaluation.ruler import generate, ruler_config
    from kvpolicy.models import load_model

    data = _ruler_run(script, wide_model_dir, prose_file, tmp_path / "run.json", question,
                      "--kvpolicy", "snapkv,knorm", "--presses", RULER_PRESSES)
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["kvpolicy:full", "kvpolicy:snapkv@0.5", "kvpolicy:knorm@0.5", "kvpress:DynamicCache",
                          "kvpress:SnapKVPress@0.5", "kvpress:KnormPress@0.5", "kvpress:KVzipPress@0.5"]
    assert data["skipped"] == {} and data["size_values"]["question"] == question.replace("-", "_")
    _, tok = load_model(str(wide_model_dir))
    config = ruler_config(tasks=("niah_single", "niah_multikey"), lengths=(256,), samples=1, haystack=str(prose_file))
    expected = generate(tok, config)
    ids = sorted((s.task, s.length, s.index, s.tokens, s.answers) for s in expected)
    for row in rows.values():
        assert _samples(row) == ids, row["label"]
        assert row["sequences"] == 2
    full = rows["kvpolicy:full"]
    assert rows["kvpress:DynamicCache"]["ruler_samples"] == full["ruler_samples"]  # no press: full's answers
    assert rows["kvpress:DynamicCache"]["layer_tokens_prefill"] == full["layer_tokens_prefill"]
    last = expected[-1]  # the rows' layer counts are the last sequence's
    context, prompt = len(last.context_ids), len(last.ids)
    for label in ("kvpress:SnapKVPress@0.5", "kvpress:KnormPress@0.5", "kvpress:KVzipPress@0.5"):
        kept = rows[label]["layer_tokens_prefill"]  # after the prompt's (or the question's) forward
        if question == "in-prompt":
            want = int(prompt * 0.5)
        else:
            want = int(context * 0.5) + len(last.question_ids)  # the context halved, every question token kept
        if label.startswith("kvpress:KVzip"):  # global allocation: layers differ, the total is the ratio's
            assert sum(kept) == pytest.approx(want * len(kept), abs=len(kept)), (label, kept, want)
        else:
            assert kept == [want] * len(kept), (label, kept, want)
        end = rows[label]["layer_tokens_end"]
        assert all(0 <= e - k < 24 for e, k in zip(end, kept)), "decoding appends, never compresses"
        assert 0.4 < rows[label]["kv_reduction_prefill"] < 0.55
    text = capsys.readouterr().out
    assert "| snapkv / SnapKVPress | " in text and f"## RULER suite (question {question})" in text


@KVPRESS
def test_ruler_runs_per_press_merge(script, tiny_model_dir, prose_file, tmp_path):  # noqa: F811
    """One process per press (each with its own full row) merges into one table on the same samples."""
    a = _ruler_run(script, tiny_model_dir, prose_file, tmp_path / "a.json", "in-prompt", "--kvpolicy", "",
                   "--presses", "knorm")
    assert [r["label"] for r in a["rows"]] == ["kvpolicy:full", "kvpress:DynamicCache", "kvpress:KnormPress@0.5"]
    b = _ruler_run(script, tiny_model_dir, prose_file, tmp_path / "b.json", "in-prompt", "--kvpolicy", "tova",
                   "--presses", "tova", "--no-press-baseline")
    assert [r["label"] for r in b["rows"]] == ["kvpolicy:full", "kvpolicy:tova@0.5", "kvpress:TOVAPress@0.5"]
    merged_path = tmp_path / "merged.json"
    assert script.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                        "--json", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    labels = [r["label"] for r in merged["rows"]]
    assert labels == ["kvpolicy:full", "kvpress:DynamicCache", "kvpress:KnormPress@0.5", "kvpolicy:tova@0.5",
                      "kvpress:TOVAPress@0.5"]
    assert len({tuple(_samples(r)) for r in merged["rows"]}) == 1
    assert [m["file"] for m in merged["meta"]["merged"]] == ["a.json", "b.json"]
    assert not merged["partial"] and "partial" not in b  # rewritten after each row, complete at the end
    (tmp_path / "b.json").write_text(json.dumps({**b, "rows": b["rows"][:2], "partial": True}))
    cut = script.merge_results(script.load_runs([str(tmp_path / "a.json"), str(tmp_path / "b.json")]), ["x"])
    assert cut["partial"] and "**Partial**" in script.markdown_report(cut)
    assert "kvpress:TOVAPress@0.5" not in [r["label"] for r in cut["rows"]]
    by = {r["label"]: r for r in merged["rows"]}
    assert by["kvpress:TOVAPress@0.5"]["ruler_score"] == {r["label"]: r for r in b["rows"]}[
        "kvpress:TOVAPress@0.5"]["ruler_score"]
    other = _ruler_run(script, tiny_model_dir, prose_file, tmp_path / "c.json", "after-context", "--kvpolicy", "",
                       "--presses", "")
    with pytest.raises(ValueError, match="inputs"):  # another question position: not the same inputs
        script.merge_results(script.load_runs([str(tmp_path / "a.json"), str(tmp_path / "c.json")]), ["x"])
    assert other["rows"][0]["label"] == "kvpolicy:full"
    # runs split by length pool their samples (a sample depends only on seed, task, length and index)
    argv = ["--model", str(tiny_model_dir), "--suite", "ruler", "--ruler-tasks", "niah_single", "--samples", "1",
            "--context", "320", "--haystack", str(prose_file), "--ratios", "0.5", "--threads", "1", "--kvpolicy", "",
            "--presses", "", "--no-press-baseline", "--json", str(tmp_path / "d.json")]
    assert script.main(argv) == 0
    both = script.merge_results(script.load_runs([str(tmp_path / "a.json"), str(tmp_path / "d.json")]), ["x"])
    full = both["rows"][0]
    assert full["label"] == "kvpolicy:full" and both["size_values"]["ruler_lengths"] == [256, 320]
    assert sorted((s["task"], s["length"]) for s in full["ruler_samples"]) == [
        ("niah_multikey", 256), ("niah_single", 256), ("niah_single", 320)]
    assert {(c["task"], c["length"]) for c in full["ruler_cells"]} == {
        ("niah_multikey", 256), ("niah_single", 256), ("niah_single", 320)}


@KVPRESS
def test_tasks_on_a_tiny_model(script, wide_model_dir, fake_novels, tmp_path):  # noqa: F811
    """ppl, needle and agreement through the presses: kvpress's cache without a press is the full cache,
    and the ppl task's scored chunks on a compressed cache (no positions passed) run at the true positions."""
    out = tmp_path / "tasks.json"
    assert script.main(["--model", str(wide_model_dir), "--tasks", "ppl,needle,agreement", "--sizes", "tiny",
                        "--kvpolicy", "pyramidkv", "--presses", "pyramidkv,snapkv", "--ratios", "0.5",
                        "--threads", "1", "--json", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    full, plain = rows["kvpolicy:full"], rows["kvpress:DynamicCache"]
    assert plain["ppl"] == pytest.approx(full["ppl"], rel=1e-4) and plain["agreement"] == 1.0
    for label in ("kvpress:PyramidKVPress@0.5", "kvpress:SnapKVPress@0.5"):
        assert 0.3 < rows[label]["kv_reduction_prefill"] < 0.6 and rows[label]["ppl"] < 2 * full["ppl"], label
