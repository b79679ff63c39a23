"""The text the RULER-style tasks hide their needles in: the evaluation texts (Jane Austen's novels
or the Python docs, ``kvpolicy.evaluation.texts``), or any text file.

Why words and not paragraphs: a sample must hit a target length in the model's own tokens to
within 1%, and a word (about 1.3 tokens) is a fine enough step for that, where a paragraph of
Austen can be hundreds of tokens. Whitespace is normalised to single spaces (as RULER does with
its essays), so where a needle goes is decided by sentences, not by the file's layout.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ...core.errors import KVPolicyError

#: words of at least this many letters are candidates for the word-list tasks (cwe)
MIN_VOCAB_LETTERS = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[a-z]+$")


class HaystackError(KVPolicyError):
    """A haystack text that cannot serve: missing, unreadable or too short; the message says what to do."""


@dataclass(frozen=True, eq=False)
class Haystack:
    """Named documents, each a list of words; a sample reads consecutive words from a seeded start."""

    name: str
    documents: dict[str, tuple[str, ...]]

    @classmethod
    def from_paragraphs(cls, name: str, documents: dict[str, list[str]]) -> Haystack:
        words = {doc: tuple(" ".join(paras).split()) for doc, paras in documents.items()}
        words = {doc: w for doc, w in words.items() if w}
        if not words:
            raise HaystackError(f"haystack {name!r} has no words; give a text file with prose in it")
        return cls(name, words)

    @classmethod
    def austen(cls) -> Haystack:
        """The six novels the other quality tasks use (``kvpolicy.evaluation.texts``)."""
        return cls.from_texts("austen")

    @classmethod
    def from_texts(cls, choice: str = "auto") -> Haystack:
        """One of the evaluation texts the other quality tasks use: ``austen``, ``python-docs`` or
        ``auto`` (:func:`kvpolicy.evaluation.texts.source`)."""
        from .. import texts

        chosen = texts.source(choice)
        name = "janeaustenr" if chosen.name == "austen" else chosen.name
        return cls.from_paragraphs(name, chosen.documents())

    @classmethod
    def from_file(cls, path: str | Path) -> Haystack:
        """Any UTF-8 text file: one document, read as words."""
        p = Path(path)
        if not p.is_file():
            raise HaystackError(f"haystack file {str(p)!r} does not exist; pass a UTF-8 text file or omit it "
                                "for the evaluation texts (--texts)")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise HaystackError(f"cannot read haystack file {str(p)!r} as UTF-8 text: {err}") from None
        return cls.from_paragraphs(p.name, {p.stem: [text]})

    @classmethod
    def load(cls, path: str | Path | None, texts: str = "auto") -> Haystack:
        """The file at ``path``, or without one the evaluation texts ``texts`` names."""
        return cls.from_texts(texts) if path is None else cls.from_file(path)

    def start(self, rng: random.Random) -> tuple[str, int]:
        """A seeded document and word offset to read from."""
        doc = rng.choice(sorted(self.documents))
        return doc, rng.randrange(len(self.documents[doc]))

    def words(self, doc: str, start: int, count: int) -> list[str]:
        """``count`` consecutive words of ``doc`` from ``start``, wrapping round at its end."""
        words = self.documents[doc]
        return [words[(start + i) % len(words)] for i in range(count)]

    @functools.cached_property
    def vocabulary(self) -> list[str]:
        """Distinct lower-case words of at least :data:`MIN_VOCAB_LETTERS` letters, sorted (the
        word-list tasks draw from it, so it comes from the same text as everything else)."""
        found = {w.lower().strip(".,;:!?\"'()[]-_") for words in self.documents.values() for w in words}
        return sorted(w for w in found if len(w) >= MIN_VOCAB_LETTERS and _WORD.match(w))


def sentences(words: list[str]) -> list[str]:
    """The words joined and cut after each ``.``, ``!`` or ``?``: the places a needle may go."""
    text = " ".join(words)
    return [s for s in _SENTENCE_END.split(text) if s]


def insert_at_depths(parts: list[str], inserts: list[str], depths: list[float]) -> list[str]:
    """``parts`` with ``inserts[i]`` placed before part ``int(depths[i] * len(parts))``; inserts at
    the same place keep their order (so a chain of statements stays in order)."""
    at = [min(len(parts), max(0, int(d * len(parts)))) for d in depths]
    order = sorted(range(len(inserts)), key=lambda i: (at[i], i))
    out: list[str] = []
    k = 0
    for pos in range(len(parts) + 1):
        while k < len(order) and at[order[k]] == pos:
            out.append(inserts[order[k]])
            k += 1
        if pos < len(parts):
            out.append(parts[pos])
    return out
