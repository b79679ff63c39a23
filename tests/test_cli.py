"""``kvpolicy compare``: bad input fails in one line with exit 2; a real run writes valid JSON
whose numbers are the right ones (rows picked by policy, KV reductions at their targets, the
reference measured against itself, and a ``meta`` block saying where the rows came from).

The end-to-end runs use a tiny random Llama saved with a word-level tokenizer built here
(no download), and a few paragraphs standing in for the novels, so the file stays fast.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.core.config import load_preset
from kvpolicy.evaluation import report, texts
from kvpolicy.evaluation.rdata import read_lazyload_db
from kvpolicy.evaluation.tasks import PRESETS, NeedleTask, PerplexityTask

ROOT = Path(__file__).resolve().parents[1]
#: the tiny model below: 4 layers, 2 KV heads of 64 / 4 = 16 dims, float32
TINY_LAYERS, TINY_KV_HEADS, TINY_HEAD_DIM, FLOAT32_BYTES = 4, 2, 16, 4
TINY_BYTES_PER_TOKEN = TINY_LAYERS * 2 * TINY_KV_HEADS * TINY_HEAD_DIM * FLOAT32_BYTES  # keys + values, all layers

PARAGRAPHS = [
    "It is a truth universally acknowledged that a single man in possession of a good fortune "
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood "
    "this truth is so well fixed in the minds of the surrounding families that he is considered "
    "the rightful property of some one or other of their daughters.",
    "My dear Mr. Bennet said his lady to him one day have you heard that Netherfield Park is let at last?",
    "Mr. Bennet replied that he had not. But it is returned she for Mrs. Long has just been here "
    "and she told me all about it.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


@pytest.fixture(autouse=True)
def fake_novels(monkeypatch):
    """Six short 'novels' so no test depends on the Debian package."""
    fake = {name: [f"{p} ({name} {i})" for i, p in enumerate(PARAGRAPHS * 3)] for name in texts.NOVELS}
    monkeypatch.setattr(texts, "novels", lambda: fake)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = " ".join(PARAGRAPHS + ["secret passkey number only text above extract novel hidden below answer"])
    words += " " + " ".join(str(d) for d in range(10)) + " " + " ".join(texts.NOVELS)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _fails(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kvpolicy: error:") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["compare", "--tasks", "ppl,bleu"], "unknown task bleu"),
        (["compare", "--policies", "full,pyramidd"], "unknown policy 'pyramidd'"),
        (["compare", "--ratio", "1.5"], "--ratio 1.5 is outside [0, 1)"),
        (["compare", "--ratio", "-0.1"], "outside [0, 1)"),
        (["compare", "--ratios", "0.2,0.9,1"], "--ratios 1 is outside"),
        (["compare", "--ratios", "0.2,half"], "ratios must be numbers"),
        (["compare", "--ratio", "abc"], "invalid float value"),
        (["compare", "--model", "/no/such/model"], "does not exist"),
        (["compare", "--config", "no_such_preset"], "no preset or file named"),
        (["compare", "--sizes", "huge"], "unknown size preset"),
        (["compare", "--json", "/no/such/dir/out.json"], "does not exist"),
        (["compare", "--plot", "out.svg"], "should end in .png"),
        (["compare", "--max-new-tokens", "0"], "positive integer"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    _fails(capsys, argv, needle)


def test_not_a_gguf_file(tmp_path, capsys):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    _fails(capsys, ["compare", "--model", str(path)], "not a .gguf")


def test_corrupt_gguf(tmp_path, capsys):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\0garbage" * 8)
    _fails(capsys, ["compare", "--model", str(path), "--quiet"], "is truncated or corrupt")


def test_missing_novels_name_install_command(no_novels, capsys):
    _fails(capsys, ["compare", "--tasks", "ppl", "--texts", "austen"], texts.INSTALL_HINT)
    _fails(capsys, ["compare", "--texts", "shakespeare"], "invalid choice")


def test_compare_without_the_novels(no_novels, tiny_model_dir, tmp_path, capsys):
    """No Debian package: the default run reads the Python docs, says so once on stderr, and records it."""
    out = tmp_path / "rows.json"
    argv = ["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--policies", "h2o",
            "--json", str(out), "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "novels are not installed" in err and texts.INSTALL_HINT in err and "--texts python-docs" in err
    data = json.loads(out.read_text())
    report.validate_results(data, ["ppl", "needle", "agreement"])
    assert data["meta"]["sizes"]["texts"] == "python-docs"
    assert data["meta"]["texts"] == texts.SOURCES["python-docs"].title
    assert main([*argv, "--texts", "python-docs"]) == 0
    assert "novels" not in capsys.readouterr().err, "a source chosen by name needs no note"
    again = json.loads(out.read_text())
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in data["rows"]], "auto read the same text"


def test_compare_records_the_novels(tiny_model_dir, tmp_path, capsys):
    """With the novels there (here: the stand-ins), ``auto`` reads them, silently, and records them."""
    out = tmp_path / "rows.json"
    assert main(["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--policies", "h2o",
                 "--tasks", "ppl", "--json", str(out), "--quiet"]) == 0
    assert "note" not in capsys.readouterr().err
    meta = json.loads(out.read_text())["meta"]
    assert meta["sizes"]["texts"] == "austen" and meta["texts"] == texts.SOURCE


def test_module_entry_point_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "kvpolicy", "compare", "--tasks", "nope"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("kvpolicy: error: unknown task nope")
    assert "Traceback" not in proc.stderr


def _pyramid_prefill_keep(n: int, preset: dict, layers: int) -> list[int]:
    """Tokens each layer keeps of an ``n``-token prompt under a PyramidInfer preset, worked out
    from the paper's schedule independently of kvpolicy's code: the last ``1 + int(n * recent)``
    tokens vote and stay; the context before them shrinks layer by layer by the cosine ratio
    ``(1 - r) * (cos(pi * l / L) + 1) / 2 + r`` of the layer below, unless that would go under the
    floor (``min_context_length``)."""
    recent = 1 + int(n * preset["prefill_recent_ratio"])
    final = preset["prefill_decay_ratio"]
    context, keep = n - recent, []
    for layer in range(layers):
        keep.append(context + recent)
        ratio = (1 - final) * (math.cos(math.pi * layer / layers) + 1) / 2 + final
        if ratio < 1 and int(context * ratio) > preset["min_context_length"]:
            context = int(context * ratio)
    return keep


def _tiny_prompt_lengths(model_dir: Path) -> list[int]:
    """Prompt tokens of every sequence ``compare --sizes tiny`` measures, in order: the ppl prefix,
    the needle prompts, the agreement prompt."""
    from transformers import AutoTokenizer

    sizes = PRESETS["tiny"]
    needle = NeedleTask()
    needle.prepare(AutoTokenizer.from_pretrained(model_dir), sizes)
    return [sizes.ppl_prefix] * sizes.ppl_docs + [len(s["ids"]) for s in needle.samples] + (
        [sizes.agreement_prompt_tokens] * sizes.agreement_prompts)


#: a random-weights model predicts almost uniformly, so evicting context barely moves its
#: perplexity: this bound only catches a broken ratio (the real model's bound is below)
TINY_PPL_RATIO_BOUND = 1.05


def test_compare_json_schema(tiny_model_dir, tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "plot.png"
    argv = ["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--policies",
            "pyramidinfer,h2o,streamingllm,snapkv,random", "--ratio", "0.54", "--json", str(out),
            "--plot", str(png), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "kvpolicy compare" in table and "h2o@0.54" in table and "asked" in table and "removed" in table
    data = json.loads(out.read_text())
    report.validate_results(data, ["ppl", "needle", "agreement"])
    rows = data["rows"]
    by = {r["label"]: r for r in rows}
    # --ratio applies to pyramidinfer too (issue #26: it used to run its own schedule, removing far less)
    assert list(by) == ["full", "pyramidinfer@0.54", "h2o@0.54", "streamingllm@0.54", "snapkv@0.54", "random@0.54"]
    full = by["full"]

    # full holds every token: its bytes after prefill are the prompts' KV size worked out by hand
    lengths = _tiny_prompt_lengths(tiny_model_dir)
    assert full["sequences"] == len(lengths)
    assert full["kv_bytes_prefill"] == int(sum(lengths) * TINY_BYTES_PER_TOKEN / len(lengths))
    assert full["layer_tokens_prefill"] == [lengths[-1]] * TINY_LAYERS
    assert full["kv_reduction"] == 0.0 and full["agreement"] == 1.0
    # the reference's ppl_ratio is measured (its ppl over the reference ppl, itself), and so is every row's
    assert full["ppl_ratio"] == full["ppl"] / full["ppl"] == 1.0
    for row in rows:
        assert row["ppl_ratio"] == pytest.approx(row["ppl"] / full["ppl"], rel=1e-12), row["label"]

    # budget policies that also evict while decoding: the reduction is the asked ratio, at the end too
    for label in ("h2o@0.54", "streamingllm@0.54", "random@0.54"):
        row = by[label]
        assert abs(row["kv_reduction"] - 0.54) < 0.02, (label, row["kv_reduction"])
        assert abs(row["kv_reduction_prefill"] - 0.54) < 0.02, (label, row["kv_reduction_prefill"])
        assert row["kv_bytes"] < full["kv_bytes"] and row["ppl_ratio"] < TINY_PPL_RATIO_BOUND, row
    # snapkv compresses the prompt only: the asked ratio after prefill, less at the end
    snap = by["snapkv@0.54"]
    assert abs(snap["kv_reduction_prefill"] - 0.54) < 0.02, snap
    assert 0.4 < snap["kv_reduction"] < snap["kv_reduction_prefill"] and snap["ppl_ratio"] < TINY_PPL_RATIO_BOUND

    # pyramidinfer at the asked ratio, its pyramid shape scaled to it: the prompts' KV removed within 1.5 points
    pyr = by["pyramidinfer@0.54"]
    assert pyr["ratio"] == 0.54 and abs(pyr["kv_reduction_prefill"] - 0.54) <= 0.015, pyr["kv_reduction_prefill"]
    assert pyr["layer_tokens_prefill"] == sorted(pyr["layer_tokens_prefill"], reverse=True)
    assert pyr["ppl_ratio"] < TINY_PPL_RATIO_BOUND
    assert png.stat().st_size > 10_000


def test_compare_runs_pyramidinfer_on_its_own_schedule_when_a_config_says_so(tiny_model_dir, tmp_path):
    """``--config`` with ``compression_ratio: null`` keeps PyramidInfer's reference schedule (no target) beside
    budget policies at --ratio: the per-layer counts are the paper's, worked out by hand."""
    config = tmp_path / "own.yaml"
    config.write_text("policy: pyramidinfer\ncompression_ratio: null\n")
    out = tmp_path / "rows.json"
    assert main(["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--policies", "pyramidinfer,h2o",
                 "--config", str(config), "--ratio", "0.54", "--tasks", "ppl", "--json", str(out), "--quiet"]) == 0
    by = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(by) == ["full", "pyramidinfer", "h2o@0.54"]
    preset = load_preset("pyramidinfer_llama2_7b")  # the defaults, which the reference preset equals
    lengths = [PRESETS["tiny"].ppl_prefix] * PRESETS["tiny"].ppl_docs
    keep = [_pyramid_prefill_keep(n, preset, TINY_LAYERS) for n in lengths]
    pyr = by["pyramidinfer"]
    assert pyr["ratio"] is None and pyr["layer_tokens_prefill"] == keep[-1]
    expected = 1 - sum(map(sum, keep)) / (TINY_LAYERS * sum(lengths))
    assert pyr["kv_reduction_prefill"] == pytest.approx(expected, abs=1e-12)


def test_compare_json_meta(tiny_model_dir, tmp_path):
    """The results file says where its rows came from: command and argv, commit and dirty flag,
    versions, machine and threads, date, and the run's own settings."""
    out = tmp_path / "rows.json"
    argv = ["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--policies", "full", "--tasks", "ppl",
            "--json", str(out), "--quiet"]
    assert main(argv) == 0
    meta = json.loads(out.read_text())["meta"]
    report.validate_meta(meta)
    assert meta["argv"] == ["kvpolicy", *argv]
    assert meta["command"].startswith("kvpolicy compare --model ") and meta["tool"] == "kvpolicy compare"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clone is one)
        assert meta["commit"] == head.stdout.strip() and isinstance(meta["dirty"], bool)
    else:
        assert meta["commit"] is None and meta["dirty"] is None
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["transformers"]
    assert meta["versions"]["python"] and meta["versions"]["kvpolicy"]
    assert meta["machine"]["torch_threads"] == torch.get_num_threads() and meta["machine"]["cpus"] >= 1
    date = datetime.datetime.fromisoformat(meta["date"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 600
    assert meta["sizes_preset"] == "tiny" and meta["sizes"]["ppl_prefix"] == PRESETS["tiny"].ppl_prefix
    assert meta["tasks"] == ["ppl"] and meta["labels"] == ["full"] and meta["wall_s"] >= 0
    for key in report.REQUIRED_META_KEYS:  # a file without one of them is rejected
        broken = {k: v for k, v in meta.items() if k != key}
        with pytest.raises(ValueError, match=f"meta lacks '{key}'"):
            report.validate_meta(broken)


def test_compare_json_is_written_after_each_policy(tiny_model_dir, tmp_path, monkeypatch):
    """A run cut short keeps its finished rows: the file is rewritten after each policy, marked partial
    until the end, each time with the rows' KV reductions against ``full``."""
    writes = []
    save = report.save_json
    monkeypatch.setattr(report, "save_json", lambda rows, path, meta: (writes.append((rows, meta)),
                                                                        save(rows, path, meta))[1])
    out = tmp_path / "rows.json"
    assert main(["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--policies", "full,streamingllm",
                 "--ratios", "0.25,0.75", "--tasks", "ppl", "--json", str(out), "--quiet"]) == 0
    assert [[r["label"] for r in rows] for rows, _ in writes] == [
        ["full"], ["full", "streamingllm@0.25"], ["full", "streamingllm@0.25", "streamingllm@0.75"],
        ["full", "streamingllm@0.25", "streamingllm@0.75"]]
    assert [meta.get("partial", False) for _, meta in writes] == [True, True, True, False]
    assert abs(writes[1][0][1]["kv_reduction"] - 0.25) < 0.02 and "_kv_end_each" not in writes[1][0][1]
    assert "partial" not in json.loads(out.read_text())["meta"]


def test_sweep_rows_per_ratio(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = ["sweep", "--model", str(tiny_model_dir), "--sizes", "tiny", "--policies", "full,streamingllm",
            "--ratios", "0.25,0.75", "--tasks", "ppl", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    report.validate_results(data, ["ppl"])
    assert data["meta"]["tool"] == "kvpolicy sweep" and data["meta"]["argv"] == ["kvpolicy", *argv]
    by = {r["label"]: r for r in data["rows"]}
    assert list(by) == ["full", "streamingllm@0.25", "streamingllm@0.75"]
    assert abs(by["streamingllm@0.25"]["kv_reduction"] - 0.25) < 0.02
    assert abs(by["streamingllm@0.75"]["kv_reduction"] - 0.75) < 0.02


def test_ppl_ratio_is_measured_for_the_reference():
    """The reference run divides its own perplexity by itself like any other row: 1.0 when it is
    finite, and visibly not a number when the reference itself is broken (a hard-coded 1.0 would
    hide that)."""

    class FakeMeter:
        def __init__(self, nll_per_token):
            self.nll_per_token = nll_per_token

        def score(self, model, ids, prefix, step, cache):
            n = ids.shape[1] - prefix - 1
            return self.nll_per_token * n, n

    task = PerplexityTask()
    task.sizes, task.docs = PRESETS["tiny"], [[1] * 113]
    model = SimpleNamespace(device=torch.device("cpu"))
    ref = task.run(model, lambda: None, FakeMeter(math.log(30.0)), reference=None)
    assert ref.metrics["ppl"] == pytest.approx(30.0) and ref.metrics["ppl_ratio"] == 1.0
    other = task.run(model, lambda: None, FakeMeter(math.log(45.0)), reference=ref.reference)
    assert other.metrics["ppl_ratio"] == pytest.approx(1.5)
    broken = task.run(model, lambda: None, FakeMeter(float("inf")), reference=None)
    assert math.isnan(broken.metrics["ppl_ratio"])


def test_old_results_files_still_read(tmp_path):
    """Files written before the meta block (a bare list of rows) load, and merging the re-measured
    pyramidkv rows into the main sweep gives the table printed in docs/benchmarks/quality.md."""
    bench = ROOT / "docs" / "benchmarks"
    meta, main_rows = report.load_results(bench / "quality_sweep.json")
    assert meta is None and main_rows[0]["policy"] == "full"
    rows = report.merge_runs([main_rows, report.load_results(bench / "quality_sweep_pyramidkv.json")[1]])
    assert [r["label"] for r in rows] == [r["label"] for r in main_rows]
    assert rows[0] is not main_rows[0] and rows[0] == main_rows[0]  # the main run's reference stays
    tasks = ["ppl", "needle", "agreement"]
    report.validate_rows(rows, tasks)
    doc = (bench / "quality.md").read_text().replace("¹", "")
    for line in report.markdown_table(rows, tasks).splitlines()[2:]:
        assert line in doc, line
    new = tmp_path / "new.json"
    report.save_json(rows[:2], new, {"command": "x"})
    assert report.load_results(new) == ({"command": "x"}, rows[:2])


def test_schema_validation_rejects_missing_metric():
    row = {k: (0.0 if t is float else 0 if t is int else [] if t is list else "x")
           for k, t in report.REQUIRED_KEYS.items()}
    report.validate_rows([dict(row, ppl=1.0, ppl_ratio=1.0)], ["ppl"])
    with pytest.raises(ValueError, match="lacks 'needle_accuracy'"):
        report.validate_rows([row], ["needle"])


def _novels_stem() -> Path | None:
    try:
        return texts._data_stem()
    except texts.TextsUnavailableError:
        return None


NOVELS_INSTALLED = _novels_stem() is not None


@pytest.mark.skipif(not NOVELS_INSTALLED, reason=texts.INSTALL_HINT)
def test_real_novels_decode():
    data = read_lazyload_db(_novels_stem())
    assert set(texts.NOVELS) <= set(data)
    assert data["prideprejudice"][0] == "PRIDE AND PREJUDICE"
    assert sum(len(line or "") for line in data["emma"]) > 500_000


#: measured 58.2 (torch 2.13 CPU, float32): a broken model or tokenization lands far outside
#: (random weights: ~ the 49k vocabulary), a real regression of the scoring path too
REAL_FULL_PPL_BAND = (30.0, 120.0)
#: h2o removing 54% of a 96-token prefix, 16 scored tokens: measured 1.048
REAL_H2O_PPL_RATIO_BOUND = 1.15


@pytest.mark.real_model
@pytest.mark.skipif(not NOVELS_INSTALLED, reason=texts.INSTALL_HINT)
def test_real_model_compare(tmp_path, monkeypatch, capsys):
    monkeypatch.undo()  # real novels
    out = tmp_path / "rows.json"
    argv = ["compare", "--sizes", "tiny", "--policies", "h2o", "--tasks", "ppl,agreement",
            "--json", str(out), "--quiet"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    report.validate_results(data, ["ppl", "agreement"])
    by = {r["policy"]: r for r in data["rows"]}
    assert list(by) == ["full", "h2o"]
    full, h2o = by["full"], by["h2o"]
    # SmolLM2-135M-Instruct, a 96-token prefix of Austen, 16 scored tokens
    assert REAL_FULL_PPL_BAND[0] < full["ppl"] < REAL_FULL_PPL_BAND[1], full["ppl"]
    assert full["ppl_ratio"] == full["ppl"] / full["ppl"] == 1.0 and full["agreement"] == 1.0
    assert len(full["layer_tokens_prefill"]) == 30 and full["kv_reduction"] == 0.0
    assert abs(h2o["kv_reduction"] - 0.54) < 0.02 and abs(h2o["kv_reduction_prefill"] - 0.54) < 0.02, h2o
    assert h2o["ppl_ratio"] == pytest.approx(h2o["ppl"] / full["ppl"], rel=1e-12)
    assert h2o["ppl_ratio"] < REAL_H2O_PPL_RATIO_BOUND, h2o["ppl_ratio"]


def test_compare_question_after_context(tiny_model_dir, tmp_path):
    """``--question after-context``: the needle document is compressed alone and the question continues
    the cache; snapkv (prompt-only compression) then halves the document and keeps every question token."""
    from transformers import AutoTokenizer

    out = tmp_path / "rows.json"
    argv = ["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--tasks", "needle", "--policies",
            "snapkv", "--ratio", "0.5", "--question", "after-context", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    report.validate_results(data, ["needle"])
    assert data["meta"]["sizes"]["question"] == "after_context"
    needle = NeedleTask()
    needle.prepare(AutoTokenizer.from_pretrained(tiny_model_dir), PRESETS["tiny"].replace(question="after_context"))
    last = needle.samples[-1]
    c, q = len(last["context"]), len(last["question"])
    assert last["ids"] == last["context"] + last["question"] and q > 3
    by = {r["label"]: r for r in data["rows"]}
    assert by["full"]["layer_tokens_prefill"] == [c + q] * TINY_LAYERS
    assert by["snapkv@0.5"]["layer_tokens_prefill"] == [c - int(c * 0.5) + q] * TINY_LAYERS


def test_bad_question_position_is_refused(capsys):
    assert main(["compare", "--question", "before"]) == 2
    assert "--question" in capsys.readouterr().err


def test_a_policy_at_one_ratio():
    from kvpolicy.evaluation.runner import build_specs

    specs = build_specs(["pyramidinfer@0.5", "snapkv"], [0.3])
    assert [s.label for s in specs] == ["full", "pyramidinfer@0.5", "snapkv@0.3"]
    assert specs[1].settings == {"compression_ratio": 0.5}
    from kvpolicy import ConfigError

    with pytest.raises(ConfigError, match="name@ratio"):
        build_specs(["snapkv@half"], [0.3])
    with pytest.raises(ConfigError, match="outside"):
        build_specs(["snapkv@1.5"], [0.3])


#: the same run on the Python docs, measured 68.4 (full) and 1.039 (h2o's ratio), torch 2.13 CPU float32
REAL_DOCS_FULL_PPL_BAND = (30.0, 150.0)


@pytest.mark.real_model
def test_real_model_compare_without_the_novels(no_novels, tmp_path, capsys):
    """The README's main job on a machine without Debian's package, at the tiny sizes: it runs, on the Python docs."""
    out = tmp_path / "rows.json"
    argv = ["compare", "--sizes", "tiny", "--policies", "h2o", "--tasks", "ppl,needle,agreement",
            "--json", str(out), "--quiet"]
    assert main(argv) == 0
    assert "--texts python-docs" in capsys.readouterr().err
    data = json.loads(out.read_text())
    report.validate_results(data, ["ppl", "needle", "agreement"])
    assert data["meta"]["sizes"]["texts"] == "python-docs"
    full, h2o = data["rows"]
    assert REAL_DOCS_FULL_PPL_BAND[0] < full["ppl"] < REAL_DOCS_FULL_PPL_BAND[1], full["ppl"]
    assert full["agreement"] == 1.0 and abs(h2o["kv_reduction"] - 0.54) < 0.02
    assert h2o["ppl_ratio"] < REAL_H2O_PPL_RATIO_BOUND, h2o["ppl_ratio"]
