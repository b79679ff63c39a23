"""Prose that ships with every CPython: the Python language reference's help topics.

Why this text: the quality tasks need long, natural English that is there on any machine with
pip alone and no root. ``pydoc_data.topics`` (what ``help("if")`` prints) is part of CPython's
standard library: about 36,000 words of the reference manual's prose (Python 3.11) once the
code examples, grammar rules, tables and headings are dropped, enough for contexts of tens of
thousands of tokens (a longer one wraps round to its start). It is technical prose, not a
story, so its perplexities are not comparable with the novels'; results record which text they
were measured on.

Its wording follows the Python version (each release regenerates the topics), so the source's
title names the version that produced a result.
"""

from __future__ import annotations

import functools
import platform
import re

#: a paragraph ends a sentence (optionally inside quotes or brackets)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
#: an ordinary word of prose (capitalised or not, one punctuation mark after it)
_PROSE_WORD = re.compile(r"^[A-Za-z][a-z]*[,.;:!?]?$")
#: a paragraph must have at least this many words, this share of them ordinary words
MIN_WORDS = 8
MIN_PROSE_SHARE = 0.7
#: a list item's marker, dropped from the start of its paragraph
_ITEM_MARKER = re.compile(r"^(\* |- |\d+\. )")
_UNDERLINE_CHARS = set("*=-+|")


class PyDocsUnavailableError(Exception):
    """This Python was built without ``pydoc_data`` (some minimal distributions strip it)."""


#: what a results file and a note say this text is
TITLE = (f"the help topics of the Python {platform.python_version()} language reference "
         "(pydoc_data.topics, shipped with CPython)")


def is_prose(block: str) -> bool:
    """Whether a blank-line separated block of a help topic is a paragraph of prose: not a heading
    (underlined with ``***``/``===``), a grammar rule, an interpreter session, a table or a code
    example, but a run of ordinary words ending a sentence."""
    lines = [line for line in block.split("\n") if line.strip()]
    if not lines:
        return False
    if any(set(line.strip()) <= _UNDERLINE_CHARS for line in lines):
        return False
    if any(">>>" in line or "::=" in line or line.strip().startswith(("...", "|")) for line in lines):
        return False
    text = _ITEM_MARKER.sub("", " ".join(line.strip() for line in lines))
    words = text.split()
    if len(words) < MIN_WORDS or not _SENTENCE_END.search(text):
        return False
    return sum(bool(_PROSE_WORD.match(w)) for w in words) >= MIN_PROSE_SHARE * len(words)


def paragraphs(topic: str) -> list[str]:
    """The prose paragraphs of one help topic, each on one line, list markers dropped."""
    blocks = re.split(r"\n\s*\n", topic)
    return [_ITEM_MARKER.sub("", " ".join(line.strip() for line in b.split("\n") if line.strip()))
            for b in blocks if is_prose(b)]


@functools.lru_cache(maxsize=1)
def documents() -> dict[str, list[str]]:
    """One document, ``reference``: the prose paragraphs of every topic, topics in name order
    (one long document, so a passage may run from one topic into the next as a chapter would).
    Several topics share whole sections (``dict`` and ``typesmapping``, for one): a paragraph is
    kept where it first occurs, so no passage reads the same text twice."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise PyDocsUnavailableError(
            f"this Python ({platform.python_version()}) lacks the standard library's pydoc_data module"
        ) from None
    every = [p for name in sorted(topics) for p in paragraphs(topics[name])]
    return {"reference": list(dict.fromkeys(every))}
