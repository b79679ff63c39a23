"""The evaluation texts: the Python docs that ship with CPython serve on any machine (no Debian
package, no root), ``auto`` picks the novels only where they are installed, a chosen source that is
missing fails naming the fix, and the tasks read the source their sizes name.

"Not installed" is made here by pointing the novels' search path at nothing, so these tests take
the no-Debian path on every machine, the CI's included, whether or not the package is there.
"""

from __future__ import annotations

import random
import re

import pytest

from kvpolicy.evaluation import pydocs, texts
from kvpolicy.evaluation.ruler import Haystack, RulerConfig
from kvpolicy.evaluation.tasks import PRESETS, AgreementTask, EvalSizes, NeedleTask, PerplexityTask

#: the longest RULER context the docs record (docs/benchmarks/ruler.md) is 16k tokens: the Python docs
#: must hold a haystack of that many tokens without repeating (a token is about 0.75 words of English)
LONGEST_CONTEXT_WORDS = 16_384 * 3 // 4


class CharTokenizer:
    """One token per character: enough for the tasks' length arithmetic, and independent of any model."""

    chat_template = None
    bos_token = ""
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


TOPIC = """The "spam" statement
********************

The "spam" statement repeats its suite until the eggs run out, which
may take a while on a large breakfast.

   spam_stmt ::= "spam" expression ":" suite

For example:

   >>> spam 3:
   ...     eat()

* every item of a list is kept when it is a sentence of ordinary words like this one.

Short line.

   Indented prose of a method's description is kept too, as long as
   it reads as sentences of words.
"""


def test_only_the_prose_of_a_help_topic_is_kept():
    assert pydocs.paragraphs(TOPIC) == [
        'The "spam" statement repeats its suite until the eggs run out, which may take a while on a large breakfast.',
        "every item of a list is kept when it is a sentence of ordinary words like this one.",
        "Indented prose of a method's description is kept too, as long as it reads as sentences of words.",
    ]


def test_the_python_docs_are_long_prose():
    paras = pydocs.documents()["reference"]
    words = [w for p in paras for w in p.split()]
    assert len(words) >= LONGEST_CONTEXT_WORDS, len(words)
    assert all(re.search(r"[.!?][\"')\]]*$", p) and ">>>" not in p and "::=" not in p for p in paras)
    assert len(set(paras)) == len(paras), "no paragraph twice (topics that share sections)"


def test_auto_reads_the_python_docs_without_the_novels(no_novels):
    with pytest.raises(texts.TextsUnavailableError):
        texts.novels()
    chosen = texts.source()
    assert chosen.name == "python-docs" and chosen.documents() == pydocs.documents()
    note = texts.fell_back("auto", chosen)
    assert "--texts python-docs" in note and texts.INSTALL_HINT in note
    assert texts.fell_back("python-docs", chosen) is None


def test_a_chosen_source_that_is_missing_names_the_fix(no_novels):
    with pytest.raises(texts.TextsUnavailableError, match=re.escape(texts.INSTALL_HINT)) as err:
        texts.source("austen")
    assert "--texts python-docs" in str(err.value)
    with pytest.raises(texts.TextsUnavailableError, match="choose from auto, austen, python-docs"):
        texts.source("shakespeare")


def test_python_docs_missing_names_the_fix(monkeypatch):
    def missing():
        raise pydocs.PyDocsUnavailableError("this Python lacks the standard library's pydoc_data module")

    monkeypatch.setattr(pydocs, "documents", missing)
    with pytest.raises(texts.TextsUnavailableError, match="--texts austen"):
        texts.source("python-docs")


def test_auto_prefers_the_novels_where_installed(monkeypatch):
    fake = {name: [f"A sentence of {name}, number {i}." for i in range(5)] for name in texts.NOVELS}
    monkeypatch.setattr(texts, "novels", lambda: fake)
    chosen = texts.source()
    assert chosen.name == "austen" and chosen.documents() is fake and chosen.extract_of == "a novel"
    assert texts.fell_back("auto", chosen) is None


def test_auto_does_not_hide_a_broken_install(monkeypatch):
    def broken():
        raise texts.TextsUnavailableError("janeaustenr data lacks some novels; reinstall")

    monkeypatch.setattr(texts, "novels", broken)
    with pytest.raises(texts.TextsUnavailableError, match="reinstall"):
        texts.source()


def _in_order(passage: str, paragraphs: list[str]) -> bool:
    """Whether ``passage`` is consecutive paragraphs of ``paragraphs`` (cut at either end)."""
    joined = "\n\n".join(paragraphs + paragraphs)
    return passage in joined


def test_the_tasks_read_the_source_their_sizes_name(no_novels):
    tok = CharTokenizer()
    sizes = PRESETS["tiny"].replace(texts="python-docs")
    paras = pydocs.documents()["reference"]
    ppl = PerplexityTask()
    ppl.prepare(tok, sizes)
    agreement = AgreementTask()
    agreement.prepare(tok, sizes)
    for ids in ppl.docs + agreement.prompts:
        assert _in_order(tok.decode(ids), paras)
    needle = NeedleTask()
    needle.prepare(tok, sizes)
    prompt = tok.decode(needle.samples[0]["ids"])
    assert prompt.startswith("Below is an extract from the Python language reference.")
    hay = prompt.split("\n\n")[1]
    assert hay in paras or "secret passkey" in hay


def test_the_ruler_haystack_follows_the_texts(no_novels):
    hay = Haystack.load(None, "python-docs")
    assert hay.name == "python-docs"
    assert hay.documents["reference"] == tuple(" ".join(pydocs.documents()["reference"]).split())
    assert Haystack.load(None).documents == hay.documents  # auto, without the novels
    assert RulerConfig().texts == "auto"
    with pytest.raises(ValueError, match="unknown texts"):
        RulerConfig(texts="shakespeare")


def test_sizes_refuse_an_unknown_source():
    assert EvalSizes().texts == "auto"
    with pytest.raises(ValueError, match="texts must be one of auto, austen, python-docs"):
        EvalSizes(texts="shakespeare")


def test_the_haystack_draws_are_seeded(no_novels):
    tok = CharTokenizer()
    source = texts.source("python-docs")
    first = texts.haystack(tok, 500, random.Random(3), source)
    assert first == texts.haystack(tok, 500, random.Random(3), source)
    assert sum(len(p) + 2 for p in first) >= 500
