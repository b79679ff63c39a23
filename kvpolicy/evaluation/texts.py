"""Real English prose to evaluate on, from one of two sources (``kvpolicy compare --texts``).

Why these texts: KV-cache policies must be judged on long, natural text (random tokens or
repeated filler make every eviction look harmless or hopeless). Two sources, both read offline:

* ``austen``: Jane Austen's six novels (public domain). Debian packages them
  (``r-cran-janeaustenr``, MIT-licensed packaging by Julia Silge); we read the package's R data
  directly (see :mod:`.rdata`), R itself is never run. Installing it needs root and apt-get.
* ``python-docs``: the Python language reference's help topics, which ship with CPython
  (:mod:`.pydocs`): there on any machine with pip alone, as any user.
* ``auto`` (the default): the novels where they are installed (the recorded benchmarks were
  measured on them), else the Python docs. The CLI says so on stderr when it falls back, and
  every results file records the source used (``meta.texts``, ``meta.sizes.texts``).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import KVPolicyError
from . import pydocs
from .rdata import RDataError, read_lazyload_db

INSTALL_HINT = "apt-get install --no-install-recommends r-cran-janeaustenr"
SOURCE = (
    "Jane Austen's novels, Debian package r-cran-janeaustenr (R package janeaustenr 1.0.0, MIT; texts public domain)"
)
NOVELS = ("prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey", "persuasion")
_R_LIBRARIES = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library")


class TextsUnavailableError(KVPolicyError):
    """The chosen evaluation texts are not installed; the message names the install command
    (or the other source)."""


class NovelsNotInstalledError(TextsUnavailableError):
    """Debian's r-cran-janeaustenr is not on R's search path (``auto`` then reads the Python docs;
    an installed but unreadable package is an error, not a reason to read other text)."""


def _data_stem() -> Path:
    given = [os.environ.get(var, "") for var in ("R_LIBS", "R_LIBS_USER")]
    dirs = [d for paths in given for d in paths.split(os.pathsep) if d] + list(_R_LIBRARIES)
    for d in dirs:
        stem = Path(d) / "janeaustenr" / "data" / "Rdata"
        if stem.with_suffix(".rdx").is_file():
            return stem
    raise NovelsNotInstalledError(f"the evaluation texts (Jane Austen's novels) are not installed; run: {INSTALL_HINT} "
                                  "(as root), or use --texts python-docs (Python's own reference docs)")


def _paragraphs(lines: list[str | None]) -> list[str]:
    """Join wrapped lines into paragraphs; drop headings (short lines in capitals, chapter titles)."""
    out: list[str] = []
    current: list[str] = []
    for line in lines + [""]:
        line = (line or "").strip()
        if line:
            current.append(line)
            continue
        if current:
            text = " ".join(current)
            heading = len(text) < 40 and (text.isupper() or text.lower().startswith(("chapter", "volume")))
            if not heading:
                out.append(text)
            current = []
    return out


@functools.lru_cache(maxsize=1)
def novels() -> dict[str, list[str]]:
    """Paragraphs of each novel, by the package's object name (``emma``, ``persuasion``, ...)."""
    try:
        data = read_lazyload_db(_data_stem())
    except RDataError as err:
        raise TextsUnavailableError(f"{err}; reinstall: {INSTALL_HINT}") from None
    out = {name: _paragraphs(data[name]) for name in NOVELS if name in data}
    if len(out) != len(NOVELS):
        raise TextsUnavailableError(f"janeaustenr data lacks some novels; reinstall: {INSTALL_HINT}")
    return out


@dataclass(frozen=True)
class TextSource:
    """One source of prose: its ``--texts`` name, what it is (for notes and results files), the
    noun the needle task's instruction calls a passage of it, and how to read its documents
    (document name -> paragraphs; the order is the order tasks cycle through them)."""

    name: str
    title: str
    extract_of: str
    load: Callable[[], dict[str, list[str]]]

    def documents(self) -> dict[str, list[str]]:
        return self.load()


def _python_docs() -> dict[str, list[str]]:
    try:
        return pydocs.documents()
    except pydocs.PyDocsUnavailableError as err:
        raise TextsUnavailableError(f"{err}; install Python's full standard library (Debian: the "
                                    "libpython3.X-stdlib package) or use --texts austen") from None


AUTO = "auto"
SOURCES: dict[str, TextSource] = {
    "austen": TextSource("austen", SOURCE, "a novel", lambda: novels()),
    "python-docs": TextSource("python-docs", pydocs.TITLE, "the Python language reference", _python_docs),
}
#: what ``--texts`` accepts: a source's name, or ``auto`` (the novels where installed, else the Python docs)
CHOICES = (AUTO, *SOURCES)


def source(choice: str = AUTO) -> TextSource:
    """The source ``choice`` names, checked to be readable now (before any model work); ``auto``:
    the novels if they are installed, else the Python docs (see :func:`fell_back`)."""
    if choice == AUTO:
        try:
            novels()
        except NovelsNotInstalledError:
            return source("python-docs")
        return SOURCES["austen"]
    if choice not in SOURCES:
        raise TextsUnavailableError(f"unknown texts {choice!r}; choose from {', '.join(CHOICES)}")
    chosen = SOURCES[choice]
    chosen.documents()
    return chosen


def fell_back(choice: str, chosen: TextSource) -> str | None:
    """A one-line note when ``auto`` could not use the novels, naming what was used and the fix."""
    if choice != AUTO or chosen.name == "austen":
        return None
    return (f"note: Jane Austen's novels are not installed, so the tasks read {chosen.title} "
            f"(--texts {chosen.name}); the recorded results used the novels: {INSTALL_HINT}")


def _default(given: TextSource | None) -> TextSource:
    return given if given is not None else source(AUTO)


def passage(tokenizer: Any, paragraphs: list[str], start: int, min_tokens: int) -> list[str]:
    """Consecutive ``paragraphs`` from paragraph ``start`` (wrapping round to the first) until
    ``min_tokens`` tokens."""
    taken: list[str] = []
    count = 0
    i = start
    while count < min_tokens:
        para = paragraphs[i % len(paragraphs)]
        taken.append(para)
        count += len(tokenizer(para + "\n\n", add_special_tokens=False)["input_ids"])
        i += 1
    return taken


def token_documents(tokenizer: Any, count: int, length: int, seed: int,
                    texts: TextSource | None = None) -> list[list[int]]:
    """``count`` token sequences of exactly ``length`` tokens, each from a different document of
    ``texts`` (cycling; default: ``auto``) at a seeded paragraph offset: the documents of the
    perplexity task and the agreement prompts."""
    docs = _default(texts).documents()
    names = list(docs)
    rng = random.Random(seed)
    out = []
    for k in range(count):
        paras = docs[names[k % len(names)]]
        start = rng.randrange(len(paras))
        text = "\n\n".join(passage(tokenizer, paras, start, length + 16))
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"][:length])
    return out


def haystack(tokenizer: Any, tokens: int, rng: random.Random, texts: TextSource | None = None) -> list[str]:
    """Paragraphs of about ``tokens`` tokens from a random document of ``texts`` (default:
    ``auto``) at a random offset (the needle's hay)."""
    docs = _default(texts).documents()
    paras = docs[rng.choice(list(docs))]
    return passage(tokenizer, paras, rng.randrange(len(paras)), tokens)
