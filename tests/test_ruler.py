"""The RULER-style suite: samples are deterministic, each holds what its task says (checked by parsing
the context independently of the generator), prompts are within 1% of the target length in the real
SmolLM2 tokenizer's tokens, the scorer is RULER's, and ``kvpolicy compare --suite ruler`` runs end to
end on a tiny model.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import tiny_model_dir  # noqa: F401 - the fixture: a tiny Llama with a word-level tokenizer

from kvpolicy.cli import _prepare, build_parser, main
from kvpolicy.core.config import load_preset
from kvpolicy.core.errors import ConfigError
from kvpolicy.core.registry import make_policy
from kvpolicy.evaluation import report, texts
from kvpolicy.evaluation.ruler import (
    DEFAULT_TASKS,
    TASK_NAMES,
    Haystack,
    HaystackError,
    RulerConfig,
    binomial_stderr,
    copy_baseline,
    generate,
    ruler_config,
    string_match_all,
)
from kvpolicy.evaluation.ruler import report as ruler_report
from kvpolicy.evaluation.ruler.prompt import slack
from kvpolicy.evaluation.ruler.task import RulerTask, plan_batches, summarize
from kvpolicy.evaluation.tasks import PRESETS
from kvpolicy.models import ModelLoadError, default_model_path
from kvpolicy.policies.pyramidinfer import RATIO_PRESET, PyramidInferConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

def _prose(sentences: int = 600, seed: int = 0) -> list[str]:
    """Seeded sentences over a few thousand made-up words (enough distinct words for ``cwe`` at 8k),
    as paragraphs of a text file that is not the novels."""
    rng = random.Random(seed)
    syllables = ["ba", "ko", "ri", "mu", "te", "sa", "lo", "ne", "vi", "du", "fa", "ge", "hi", "jo", "pu"]
    made_up = sorted({"".join(rng.choices(syllables, k=rng.choice((2, 3)))) for _ in range(4000)})
    out = []
    for _ in range(sentences):
        words = [rng.choice(made_up) for _ in range(rng.randrange(6, 14))]
        out.append("The villagers said " + " ".join(words) + rng.choice([".", "!", "?"]))
    return out


PROSE = _prose()


@functools.cache
def smollm2_tokenizer():
    """The embedded model's own tokenizer (about 10 s to read from the GGUF file)."""
    from transformers import AutoTokenizer

    try:
        path = default_model_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def prose_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "village.txt"
    path.write_text("\n\n".join(PROSE) + "\n")
    return path


def _novels_installed() -> bool:
    try:
        texts._data_stem()
    except texts.TextsUnavailableError:
        return False
    return True


NOVELS = pytest.mark.skipif(not _novels_installed(), reason=texts.INSTALL_HINT)


# ----------------------------------------------------------------------------- independent oracles
NEEDLE_RE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")
KEY_RE = re.compile(r"\b[a-z]+-[a-z]+\b")
VT_RE = re.compile(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.")
ENTRY_RE = re.compile(r"^(\d+)\. (\S+)$", re.M)
#: (keys in the context, values per key, keys asked) of each needle task
NIAH_SHAPES = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
               "niah_multiquery": (4, 1, 4)}


def expected_answers(sample) -> set[str]:
    """What the sample's answers must be, read from its context and question alone."""
    if sample.task in NIAH_SHAPES:
        keys, per_key, asked = NIAH_SHAPES[sample.task]
        pairs = NEEDLE_RE.findall(sample.context)
        assert len(pairs) == keys * per_key and len({k for k, _ in pairs}) == keys, pairs
        queried = KEY_RE.findall(sample.question)
        assert len(queried) == asked and set(queried) <= {k for k, _ in pairs}, sample.question
        return {v for k, v in pairs if k in queried}
    if sample.task == "vt":
        value = re.search(r"assigned the value (\d+)", sample.question).group(1)
        assigned = dict(VT_RE.findall(sample.context))
        assert len(assigned) == 5, assigned

        def resolve(var: str) -> str:
            rhs = assigned[var]
            return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

        for var, rhs in assigned.items():  # each statement comes after the one it refers to
            if rhs.startswith("VAR "):
                assert sample.context.index(f"VAR {rhs[4:]} =") < sample.context.index(f"VAR {var} ="), rhs
        return {v for v in assigned if resolve(v) == value}
    if sample.task == "cwe":
        entries = ENTRY_RE.findall(sample.context)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries)
        assert dict(counts) == sample.counts
        top = counts.most_common()
        assert top[9][1] > top[10][1], "the 10 common words are strictly more common than the rest"
        return {word for word, _ in top[:10]}
    if sample.task == "fwe":
        body = sample.context.split("\n")[1]
        counts = Counter(body.split())
        top = counts.most_common()
        assert top[2][1] > top[3][1], "the 3 most frequent words do not tie with the 4th"
        return {word for word, _ in top[:3]}
    raise AssertionError(f"no oracle for {sample.task}")


def check_sample(sample, tokenizer) -> None:
    assert set(sample.answers) == expected_answers(sample)
    for s in sample.once:
        assert sample.context.count(s) == 1, (sample.task, s)
    for a in sample.answers:
        if sample.task in NIAH_SHAPES:
            assert sample.context.count(a) == 1, (sample.task, a)
        assert a not in sample.question + sample.answer_prefix, "an answer leaked into the question"
    # length: rendered again independently of the generator, with the chat template in one go
    chat = tokenizer.apply_chat_template([{"role": "user", "content": sample.context + sample.question}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)
    whole = list(chat["input_ids"]) + tokenizer(sample.answer_prefix, add_special_tokens=False)["input_ids"]
    allowed = slack(sample.length, 0.01)  # 1% of the target; 16 tokens under 1,600 (one list entry is 5-8)
    assert abs(len(whole) - sample.length) <= allowed, (sample.task, len(whole), sample.length)
    assert sample.tokens == len(sample.ids) and sample.length - allowed <= sample.tokens <= sample.length
    # the two parts: the context ends before the question; the question part ends in the answer prefix
    assert sample.ids == sample.context_ids + sample.question_ids
    head = tokenizer.decode(sample.context_ids)
    tail = tokenizer.decode(sample.question_ids)
    assert sample.question not in head and head.rstrip().endswith(sample.context.rstrip()[-40:])
    assert tail.startswith(sample.question) and tail.endswith(sample.answer_prefix)


# ----------------------------------------------------------------------------- generator
@pytest.mark.parametrize("source", [pytest.param("austen", marks=NOVELS), "python-docs"])
def test_every_task_on_the_evaluation_texts(tok, source):
    """The haystacks of ``--texts``: two samples of every task at 2k tokens, every invariant checked."""
    samples = generate(tok, RulerConfig(tasks=TASK_NAMES, lengths=(2048,), samples=2, seed=5, texts=source))
    assert [(s.task, s.index) for s in samples] == [(t, i) for t in TASK_NAMES for i in range(2)]
    for s in samples:
        check_sample(s, tok)
        assert s.tokens >= 0.99 * s.length
    first = NEEDLE_RE.sub("", samples[0].context.split("\n")[1]).split()[:8]
    assert any(" ".join(first) in " ".join(ws) for ws in Haystack.from_texts(source).documents.values()), \
        f"the needle task's haystack is a passage of {source}"


def test_deterministic_for_a_seed(tok, prose_file):
    config = RulerConfig(tasks=TASK_NAMES, lengths=(512,), samples=2, seed=11, haystack=str(prose_file))
    first, again = generate(tok, config), generate(tok, config)
    assert first == again
    other = generate(tok, config.model_copy(update={"seed": 12}))
    assert [s.answers for s in other] != [s.answers for s in first]
    assert all(a.context != b.context for a, b in zip(first, other))


def test_a_sample_does_not_depend_on_the_rest_of_the_run(tok, prose_file):
    """The same (seed, task, length, index) gives the same sample whatever else is generated, so runs
    split across machines or of other sizes share their samples."""
    big = generate(tok, RulerConfig(tasks=TASK_NAMES, lengths=(512, 768), samples=3, seed=2, haystack=str(prose_file)))
    small = generate(tok, RulerConfig(tasks=("vt", "niah_multikey"), lengths=(512,), samples=2, seed=2,
                                      haystack=str(prose_file)))
    by_id = {(s.task, s.length, s.index): s for s in big}
    for s in small:
        assert by_id[(s.task, s.length, s.index)] == s


@settings(max_examples=14)
@given(seed=st.integers(0, 10**6), length=st.integers(600, 3000), task=st.sampled_from(TASK_NAMES))
def test_invariants_over_seeds_and_lengths(tok, prose_file, seed, length, task):
    (sample,) = generate(tok, RulerConfig(tasks=(task,), lengths=(length,), samples=1, seed=seed,
                                          haystack=str(prose_file)))
    assert (sample.task, sample.length, sample.seed) == (task, length, seed)
    check_sample(sample, tok)


def test_lengths_up_to_8k(tok, prose_file):
    samples = generate(tok, RulerConfig(tasks=("niah_multiquery", "cwe"), lengths=(8192,), samples=1,
                                        haystack=str(prose_file)))
    for s in samples:
        check_sample(s, tok)
        assert s.tokens >= 0.99 * s.length


def test_haystack_file_is_used(tok, prose_file):
    (s,) = generate(tok, RulerConfig(tasks=("niah_single",), lengths=(400,), samples=1, haystack=str(prose_file)))
    body = NEEDLE_RE.sub("", s.context.split("\n")[1])
    assert "villagers" in body and "Elizabeth" not in body
    assert set(body.split()) <= set(" ".join(PROSE).split()) | {"One"}


def test_bad_haystacks_name_the_fix(tmp_path):
    with pytest.raises(HaystackError, match="does not exist; pass a UTF-8 text file"):
        Haystack.from_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(HaystackError, match="has no words"):
        Haystack.from_file(empty)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown RULER task qa; choose from niah_single"):
        ruler_config(tasks=("niah_single", "qa"))
    with pytest.raises(ConfigError, match="at least 64 tokens"):
        ruler_config(lengths=(32,))
    with pytest.raises(ConfigError, match="samples"):
        ruler_config(samples=0)
    assert ruler_config(tasks=("vt", "vt")).tasks == ("vt",)


def test_too_short_a_target_names_the_smallest(tok, prose_file):
    from kvpolicy.evaluation.ruler import LengthError

    with pytest.raises(LengthError, match="use a context length of at least"):
        generate(tok, RulerConfig(tasks=("niah_multiquery",), lengths=(64,), samples=1, haystack=str(prose_file)))


# ----------------------------------------------------------------------------- scoring
def test_scorer_right_wrong_and_partly_right():
    answers = ["1234567", "7654321", "2222222", "9999999"]
    assert string_match_all("They are 1234567, 7654321, 2222222 and 9999999.", answers) == 1.0
    assert string_match_all("I do not know.", answers) == 0.0
    assert string_match_all("They are 1234567 and 2222222.", answers) == 0.5
    assert string_match_all(" 1234567", ["1234567"]) == 1.0
    assert string_match_all("AMBER-LANTERN\x00", ["amber-lantern"]) == 1.0  # case and control characters
    assert string_match_all("123456", ["1234567"]) == 0.0
    with pytest.raises(ValueError, match="at least one expected answer"):
        string_match_all("x", [])


@given(st.lists(st.integers(10**6, 10**7 - 1), min_size=1, max_size=6, unique=True), st.data())
def test_scorer_counts_the_answers_present(numbers, data):
    answers = [str(n) for n in numbers]
    said = data.draw(st.lists(st.sampled_from(answers), unique=True))
    noise = data.draw(st.text(alphabet="abc ,.\n", max_size=20))
    output = noise + ", ".join(said) + noise
    assert string_match_all(output, answers) == len(said) / len(answers)


def test_copy_baseline(tok):
    """The floor a score is read against: an answer copying the start of the haystack part."""
    needle = "One of the special magic numbers for amber-apple is: 1234567."
    later = " ".join(["It was a fine day in the village."] * 10)
    assert copy_baseline(needle + " " + later, ["1234567"], tok, 24) == 1.0
    assert copy_baseline(later + " " + needle, ["1234567"], tok, 24) == 0.0
    assert copy_baseline("1. apple\n2. pear\n3. plum", ["apple", "plum", "fig", "kiwi"], tok, 24) == 0.5


def test_binomial_stderr():
    assert binomial_stderr(0.5, 20) == pytest.approx(math.sqrt(0.25 / 20))
    assert binomial_stderr(1.0, 20) == 0.0 and math.isnan(binomial_stderr(0.5, 0))


def test_summary_averages_tasks_and_measures_against_full():
    results = [{"task": "niah_single", "length": 2048, "score": s} for s in (1, 1, 0, 1, 1, 1)]
    results += [{"task": "vt", "length": 2048, "score": s} for s in (0.4, 0.6)]
    results += [{"task": "vt", "length": 4096, "score": s} for s in (0.2, 0.0)]
    ref = summarize(results, None)
    assert ref.metrics["ruler_niah_single"] == pytest.approx(5 / 6) and ref.metrics["ruler_vt"] == pytest.approx(0.3)
    # RULER's average: each task counts once, however many samples it has (not the mean of all 10)
    assert ref.metrics["ruler_score"] == pytest.approx((5 / 6 + 0.3) / 2) and ref.metrics["ruler_score_ratio"] == 1.0
    cells = {(c["task"], c["length"]): c for c in ref.extra["ruler_cells"]}
    assert cells[("vt", 4096)]["samples"] == 2 and cells[("vt", 4096)]["score"] == pytest.approx(0.1)
    assert cells[("niah_single", 2048)]["stderr"] == pytest.approx(math.sqrt(5 / 6 * 1 / 6 / 6))
    other = summarize([dict(r, score=r["score"] / 2) for r in results], ref.reference)
    assert other.metrics["ruler_score_ratio"] == pytest.approx(0.5)
    assert math.isnan(summarize([dict(r, score=0) for r in results], None).metrics["ruler_score_ratio"])


# ----------------------------------------------------------------------------- the task in the runner
def test_batches_group_by_length_and_question_length(tok, prose_file):
    samples = generate(tok, RulerConfig(tasks=TASK_NAMES, lengths=(640, 768), samples=2, haystack=str(prose_file)))
    for by_question in (False, True):
        batches = plan_batches(samples, 3, by_question)
        assert sorted(id(s) for b in batches for s in b) == sorted(id(s) for s in samples)
        for b in batches:
            assert 1 <= len(b) <= 3 and len({s.length for s in b}) == 1
            if by_question:
                assert len({len(s.question_ids) for s in b}) == 1


class AnsweringMeter:
    """Stands in for the model: answers each row from its sample (found by its prompt's tokens), right
    for even indices, with the answer cut off by the end of turn or the token budget for odd ones."""

    def __init__(self, tokenizer, samples, eos):
        self.tokenizer, self.eos = tokenizer, eos
        self.by_ids = {tuple(s.ids): s for s in samples}
        self.calls = []

    def generate(self, model, inputs, cache, new_tokens, pad, context=None, *, stop_at_eos, prefill_rows):
        assert stop_at_eos and cache.compiled_decode is False
        self.calls.append((inputs["input_ids"].shape[0], context is not None))
        rows = []
        for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
            s = self.by_ids[tuple(i for i, m in zip(ids, mask) if m)]
            right = self.tokenizer(" " + ", ".join(s.answers) + ".", add_special_tokens=False)["input_ids"]
            if s.index % 2 == 0:
                row = right + [self.eos] + right
            elif s.index % 4 == 1:  # said after the end of the turn: not part of the answer
                row = [self.eos] + right
            else:  # said after the task's budget: not generated in a run of that task alone
                filler = self.tokenizer(" no", add_special_tokens=False)["input_ids"]
                row = filler * s.max_new_tokens + right
            rows.append((row + [pad] * new_tokens)[:new_tokens])
        return torch.tensor(rows)


@pytest.mark.parametrize("question", ["in_prompt", "after_context"])
def test_task_scores_each_row_against_its_own_sample(tok, prose_file, question):
    sizes = PRESETS["tiny"].replace(ruler_tasks=TASK_NAMES, ruler_lengths=(640, 768), ruler_samples=4,
                                    ruler_haystack=str(prose_file),
                                    batch_size=5, question=question)
    task = RulerTask()
    task.prepare(tok, sizes)
    ticks = []
    task.on_unit = lambda: ticks.append(1)
    meter = AnsweringMeter(tok, task.samples, tok.eos_token_id)
    model = SimpleNamespace(device=torch.device("cpu"), generation_config=SimpleNamespace(eos_token_id=2))
    result = task.run(model, lambda: SimpleNamespace(compiled_decode=None), meter, None)
    assert len(ticks) == task.units == len(meter.calls) and all(n <= 5 for n, _ in meter.calls)
    assert all(has_context == (question == "after_context") for _, has_context in meter.calls)
    scores = {(r["task"], r["length"], r["index"]): r["score"] for r in result.extra["ruler_samples"]}
    assert len(scores) == len(task.samples)
    for (name, length, index), score in scores.items():
        assert score == (1.0 if index % 2 == 0 else 0.0), (name, length, index)
    assert result.metrics["ruler_score"] == 0.5 and result.metrics["ruler_score_ratio"] == 1.0


# ----------------------------------------------------------------------------- the command line
def _plan(*argv: str):
    args = build_parser().parse_args(["compare", *argv])
    args.argv = ["compare", *argv]
    return _prepare(args)


def test_default_compare_is_at_equal_budgets():
    plan = _plan()
    labels = [s.label for s in plan["specs"]]
    assert labels == ["full", "pyramidinfer@0.54", "h2o@0.54", "streamingllm@0.54", "snapkv@0.54", "random@0.54"]
    pyr = plan["specs"][1]
    assert pyr.policy == "pyramidinfer" and pyr.settings == {"compression_ratio": 0.54}
    policy = make_policy({"policy": pyr.policy, **pyr.settings})  # the ratio form: its preset's shape at setup
    policy.setup(30, [True] * 30)
    preset = load_preset(RATIO_PRESET)
    assert policy.preset_name == RATIO_PRESET
    assert policy.config.model_dump() == PyramidInferConfig(**{k: v for k, v in preset.items() if k != "policy"},
                                                            compression_ratio=0.54).model_dump()


def test_suite_options():
    plan = _plan("--suite", "ruler", "--context", "2048,4096", "--samples", "3", "--ruler-tasks", "vt,cwe",
                 "--policies", "snapkv,pyramidinfer_54_floor,pyramidinfer@0.5")
    assert plan["tasks"] == ["ruler"]
    assert [s.label for s in plan["specs"]] == [
        "full", "snapkv@0.25", "snapkv@0.5", "snapkv@0.75", "snapkv@0.9", "pyramidinfer_54_floor@0.25",
        "pyramidinfer_54_floor@0.5", "pyramidinfer_54_floor@0.75", "pyramidinfer_54_floor@0.9", "pyramidinfer@0.5"]
    sizes = plan["sizes"]
    assert (sizes.ruler_lengths, sizes.ruler_samples, sizes.ruler_tasks) == ((2048, 4096), 3, ("vt", "cwe"))
    assert [s.label for s in _plan("--suite", "ruler", "--ratio", "0.3", "--policies", "h2o")["specs"]] == [
        "full", "h2o@0.3"]
    default = _plan("--suite", "ruler")["sizes"]
    assert default.ruler_tasks == DEFAULT_TASKS and set(DEFAULT_TASKS) < set(TASK_NAMES)
    # a preset that sets its own ratio runs once, at it
    assert [s.label for s in _plan("--suite", "ruler", "--policies", "h2o_half")["specs"]] == ["full", "h2o_half@0.5"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--suite", "ruler", "--tasks", "ppl"], "not both"),
        (["--suite", "ruler", "--ruler-tasks", "niah_single,qa"], "unknown RULER task qa"),
        (["--context", "2048,4096"], "several lengths only for the ruler suite"),
        (["--suite", "ruler", "--context", "2048,x"], "positive integer"),
        (["--suite", "ruler", "--samples", "0"], "--samples must be a positive integer"),
        (["--suite", "ruler", "--context", "32"], "at least 64 tokens"),
        (["--suite", "ruler", "--haystack", "/no/such/file.txt"], "does not exist"),
        (["--samples", "3"], "add --suite ruler"),
        (["--suite", "ruler", "--policies", "full,nosuchpolicy"], "unknown policy 'nosuchpolicy'"),
    ],
)
def test_suite_bad_input_is_one_line_exit_2(capsys, argv, needle):
    assert main(["compare", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvpolicy: error:") and needle in err[0], err


def test_a_context_too_short_for_a_task_is_one_line(tiny_model_dir, prose_file, capsys):  # noqa: F811
    """Found only once the model's tokenizer is loaded, and still a one-line error naming the fix."""
    argv = ["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--suite", "ruler", "--ruler-tasks", "vt",
            "--context", "100", "--haystack", str(prose_file), "--policies", "full", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after transformers' own weight-loading bar
    assert last.startswith("kvpolicy: error:") and "use a context length of at least" in last, err
    assert "Traceback" not in err


def test_cwe_on_a_haystack_of_few_words(tok, tmp_path):
    path = tmp_path / "few.txt"
    path.write_text("The cat sat on the mat. The dog sat on the log. " * 50)
    with pytest.raises(HaystackError, match="distinct words; cwe needs at least"):
        generate(tok, RulerConfig(tasks=("cwe",), lengths=(1024,), samples=1, haystack=str(path)))


def test_compare_suite_on_a_tiny_model(tiny_model_dir, prose_file, tmp_path, capsys):  # noqa: F811
    """The whole path: generation with the model's tokenizer, batched runs of every policy on the same
    samples, the table, the JSON (meta, rows, cells, samples) and the plot."""
    out, png = tmp_path / "ruler.json", tmp_path / "ruler.png"
    argv = ["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--suite", "ruler", "--ruler-tasks",
            "niah_single,vt", "--samples", "2", "--context", "384,512", "--haystack", str(prose_file),
            "--policies", "streamingllm,pyramidinfer_54_floor", "--ratios", "0.5", "--batch-size", "4",
            "--prefill-rows", "3", "--json", str(out), "--plot", str(png), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "pyramidinfer_54_floor@0.5" in table and "single" in table
    data = json.loads(out.read_text())
    report.validate_results(data, ["ruler"])
    meta, rows = data["meta"], data["rows"]
    assert meta["suite"] == "ruler" and meta["tasks"] == ["ruler"]
    assert meta["sizes"]["ruler_lengths"] == [384, 512] and meta["sizes"]["ruler_samples"] == 2
    assert [r["label"] for r in rows] == ["full", "streamingllm@0.5", "pyramidinfer_54_floor@0.5"]
    ids = None
    for row in rows:
        cells = {(c["task"], c["length"]): c["samples"] for c in row["ruler_cells"]}
        assert cells == {(t, n): 2 for t in ("niah_single", "vt") for n in (384, 512)}
        assert all(0 <= c["chance"] <= 1 for c in row["ruler_cells"])
        samples = row["ruler_samples"]
        mine = sorted((s["task"], s["length"], s["index"], tuple(s["answers"])) for s in samples)
        ids = ids or mine
        assert mine == ids, "every policy runs the same samples"
        assert all(s["length"] - slack(s["length"], 0.01) <= s["tokens"] <= s["length"] for s in samples)
        per_task = [sum(s["score"] for s in samples if s["task"] == t) / 4 for t in ("niah_single", "vt")]
        assert row["ruler_score"] == pytest.approx(sum(per_task) / 2)
        assert row["sequences"] == 2  # one batch of the 4 samples per length
    full, stream, pyr = rows
    assert full["ruler_score_ratio"] == 1.0 or math.isnan(full["ruler_score_ratio"])
    assert abs(stream["kv_reduction_prefill"] - 0.5) < 0.02
    assert abs(pyr["kv_reduction_prefill"] - 0.5) < 0.02, "the preset is scaled to the same budget"
    assert png.stat().st_size > 10_000

    # compress once, ask after: the question's tokens are not compressed, so less than half is removed
    after = tmp_path / "after.json"
    assert main(["compare", "--model", str(tiny_model_dir), "--sizes", "tiny", "--suite", "ruler", "--ruler-tasks",
                 "niah_single,niah_multikey", "--samples", "2", "--context", "384", "--haystack", str(prose_file),
                 "--policies", "snapkv", "--ratios", "0.5", "--batch-size", "4", "--question", "after-context",
                 "--json", str(after), "--quiet"]) == 0
    snap = json.loads(after.read_text())["rows"][1]
    assert json.loads(after.read_text())["meta"]["sizes"]["question"] == "after_context"
    assert 0.4 < snap["kv_reduction_prefill"] < 0.5 and len(snap["ruler_samples"]) == 4

    # the docs' tables from the same file: every policy line and the targets' lines
    text = ruler_report.markdown(rows)
    assert "| streamingllm | " in text and "| pyramidinfer_54_floor | " in text and "### targets" in text
    assert f"| niah_single | {100 * full['ruler_cells'][0]['score']:.1f} ± " in text


def test_report_merges_runs_of_other_tasks_and_lengths():
    """Runs split by task or length pool their samples per label, and every score is recomputed."""
    def row(label, samples, ratio=None):
        return {"label": label, "policy": label.split("@")[0], "ratio": ratio, "kv_reduction_prefill": 0.5,
                "ruler_samples": [{"task": t, "length": n, "index": i, "score": sc, "chance": 0.0}
                                  for t, n, i, sc in samples]}

    a = [row("full", [("vt", 2048, 0, 1.0), ("vt", 2048, 1, 0.0)]),
         row("h2o@0.5", [("vt", 2048, 0, 0.0), ("vt", 2048, 1, 0.0)], 0.5)]
    b = [row("full", [("cwe", 4096, 0, 0.6)]), row("h2o@0.5", [("cwe", 4096, 0, 0.3)], 0.5)]
    rows = ruler_report.merge_runs([a, b])
    full, h2o = rows
    assert full["ruler_vt"] == 0.5 and full["ruler_cwe"] == 0.6 and full["ruler_score"] == pytest.approx(0.55)
    assert h2o["ruler_score"] == pytest.approx(0.15) and h2o["ruler_score_ratio"] == pytest.approx(0.15 / 0.55)
    assert {(c["task"], c["length"]) for c in full["ruler_cells"]} == {("vt", 2048), ("cwe", 4096)}
    again = ruler_report.merge_runs([a, [row("full", [("vt", 2048, 1, 1.0)])]])  # a sample run again: the later
    assert again[0]["ruler_vt"] == 1.0
    lines = ruler_report.targets(rows)
    assert lines == ["at 0.5 removed the best policy, h2o@0.5 (50.0% of the KV bytes removed), keeps 27.3% of full's "
                     "score (target 95%): missed"]


def _target_row(label: str, score: float, removed: float, ratio: float | None) -> dict:
    return {"label": label, "policy": label.split(":")[-1].split("@")[0], "ratio": ratio,
            "kv_reduction_prefill": removed, "ruler_score": score}


def test_targets_count_a_row_at_the_bytes_it_removed():
    """A row run at 0.5 that removed 29% of the KV bytes (wide layers of uneven heads) is not the best at
    0.5, however well it scores: it is listed apart, with the share it removed. A row run at 0.75 that
    removed 55% counts at 0.5 (it saved at least as much memory as the rows run there)."""
    rows = [_target_row("full", 0.7, 0.0, None), _target_row("kvzip@0.5", 0.69, 0.29, 0.5),
            _target_row("tova@0.5", 0.5, 0.5, 0.5), _target_row("pyramidinfer@0.5", 0.3, 0.49, 0.5)]
    assert ruler_report.targets(rows) == [
        "at 0.5 removed the best policy, tova@0.5 (50.0% of the KV bytes removed), keeps 71.4% of full's score "
        "(target 95%): missed",
        "not counted at 0.5: kvzip@0.5 removed 29.0% of the KV bytes (score 69.0)",
        "at 0.5 removed pyramidinfer@0.5 is 20.0 points below the best (tova@0.5; target 5): missed"]
    rows.append(_target_row("kvzip@0.75", 0.68, 0.55, 0.75))
    lines = ruler_report.targets(rows)
    assert lines[0].startswith("at 0.5 removed the best policy, kvzip@0.75 (55.0% of the KV bytes removed), keeps "
                               "97.1%") and lines[0].endswith(": met")
    assert lines[2:4] == ["at 0.75 removed: no row removed 73% of the KV bytes, the target is not measured",
                          "not counted at 0.75: kvzip@0.75 removed 55.0% of the KV bytes (score 68.0)"]


def test_targets_count_rows_that_saved_bytes_by_bits_and_skip_rows_run_at_no_ratio():
    """``full+int4`` (run at no ratio, 69% of the bytes saved by 4-bit storage) is a row "at 0.5 removed"; a
    kvpress row without a press (no ratio) does not stop the kvpolicy-against-kvpress lines."""
    rows = [_target_row("kvpolicy:full", 0.7, 0.0, None), {**_target_row("kvpolicy:full+int4", 0.68, 0.69, None),
                                                           "kv_dtype": "int4"},
            _target_row("kvpolicy:tova@0.5", 0.5, 0.5, 0.5),
            {**_target_row("kvpress:QuantizedCache", 0.6, 0.69, None), "kv_dtype": "quanto-int4"},
            _target_row("kvpress:TOVAPress+quanto-int4@0.5", 0.45, 0.84, 0.5)]
    lines = ruler_report.targets(rows)
    assert lines[0].startswith("at 0.5 removed the best policy, kvpolicy:full+int4 (69.0% of the KV bytes removed)")
    assert ("at 0.5 removed the best kvpolicy row, kvpolicy:full+int4 (68.0), against the best kvpress row, "
            "kvpress:QuantizedCache (60.0): met, 8.0 points ahead") in lines


def test_targets_set_kvpolicy_against_kvpress_at_each_ratio():
    """In a kvpress_compare file the best kvpolicy row is chosen among kvpolicy's rows only, and at each ratio
    kvpress ran it is set against kvpress's best by the same bytes rule, ahead or behind."""
    rows = [_target_row("kvpolicy:full", 0.7, 0.0, None), _target_row("kvpolicy:tova@0.5", 0.5, 0.5, 0.5),
            _target_row("kvpress:KVzipPress@0.5", 0.66, 0.49, 0.5),
            _target_row("kvpress:TOVAPress@0.75", 0.2, 0.74, 0.75), _target_row("kvpolicy:tova@0.75", 0.25, 0.75, 0.75)]
    lines = ruler_report.targets(rows)
    assert lines[0].startswith("at 0.5 removed the best policy, kvpolicy:tova@0.5 ")
    assert ("at 0.5 removed the best kvpolicy row, kvpolicy:tova@0.5 (50.0), against the best kvpress row, "
            "kvpress:KVzipPress@0.5 (66.0): missed, 16.0 points behind") in lines
    assert ("at 0.75 removed the best kvpolicy row, kvpolicy:tova@0.75 (25.0), against the best kvpress row, "
            "kvpress:TOVAPress@0.75 (20.0): met, 5.0 points ahead") in lines


def test_grid_shards_and_merge(tmp_path):
    grid = _load_grid()
    assert grid.shards(list("abcdefgh"), 3) == [["a", "d", "g"], ["b", "e", "h"], ["c", "f"]]
    assert grid.shards(["a"], 4) == [["a"]]
    cmd = grid.shard_command(["h2o", "tova"], tmp_path / "s.json", ["--samples", "20"])
    assert cmd[-2:] == ["--device", "cuda"] and "h2o,tova" in cmd and "--suite" in cmd
    assert grid.shard_command(["h2o"], tmp_path / "s.json", ["--device", "cpu"]).count("--device") == 1
    for i, labels in enumerate((["full", "h2o@0.5"], ["full", "tova@0.5"])):
        rows = [{"label": lab, "policy": lab.split("@")[0], "ruler_score": 0.5} for lab in labels]
        report.save_json(rows, tmp_path / f"shard{i}.json", {"command": f"shard {i}"})
    rows, metas = grid.merge([tmp_path / "shard0.json", tmp_path / "shard1.json"])
    assert [r["label"] for r in rows] == ["full", "h2o@0.5", "tova@0.5"] and [m["command"] for m in metas] == [
        "shard 0", "shard 1"]


def _load_grid():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ruler_grid", ROOT / "benchmarks" / "ruler_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_deals_every_shard_once_and_shares_gpus():
    grid = _load_grid()
    jobs = list(range(10))
    plan = grid.queues(jobs, gpus=2, per_gpu=3)
    assert sorted(j for _, q in plan for j in q) == jobs
    assert [g for g, _ in plan] == [0, 1, 0, 1, 0, 1] and plan[0][1] == [0, 6] and plan[5][1] == [5]
    assert grid.queues([0, 1], gpus=4, per_gpu=2) == [(0, [0]), (1, [1])]  # no idle workers


def test_grid_dry_run_on_cpu(tiny_model_dir, prose_file, tmp_path):  # noqa: F811
    """The GPU command's shape, run on the CPU with the tiny model: one shard, merged file, plot, tables."""
    import subprocess
    import sys

    out = tmp_path / "grid"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ruler_grid.py"), "--out", str(out), "--gpus", "0",
         "--policies", "streamingllm", "--", "--model", str(tiny_model_dir), "--sizes", "tiny", "--ruler-tasks",
         "niah_single", "--samples", "2", "--context", "384", "--haystack", str(prose_file), "--ratios", "0.5",
         "--batch-size", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "ruler.json").read_text())
    report.validate_results(data, ["ruler"])
    assert [r["label"] for r in data["rows"]] == ["full", "streamingllm@0.5"]
    assert data["meta"]["tool"] == "benchmarks/ruler_grid.py" and len(data["meta"]["shards"]) == 1
    assert (out / "ruler.png").stat().st_size > 10_000 and "### targets" in (out / "ruler.md").read_text()
