"""Real English prose to evaluate on: Jane Austen's six novels, read offline from Debian.

Why these texts: KV-cache policies must be judged on long, natural text (random tokens or
repeated filler make every eviction look harmless or hopeless). The novels are public domain
and Debian packages them (``r-cran-janeaustenr``, MIT-licensed packaging by Julia Silge), so
they install from a registry with no network access at run time. We read the package's R
data directly (see :mod:`.rdata`); R itself is never run.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Any

from ..core.errors import KVPolicyError
from .rdata import RDataError, read_lazyload_db

INSTALL_HINT = "apt-get install --no-install-recommends r-cran-janeaustenr"
SOURCE = (
    "Jane Austen's novels, Debian package r-cran-janeaustenr (R package janeaustenr 1.0.0, MIT; texts public domain)"
)
NOVELS = ("prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey", "persuasion")
_R_LIBRARIES = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library")


class TextsUnavailableError(KVPolicyError):
    """The evaluation texts are not installed; the message names the install command."""


def _data_stem() -> Path:
    dirs = [d for d in os.environ.get("R_LIBS", "").split(os.pathsep) if d] + list(_R_LIBRARIES)
    for d in dirs:
        stem = Path(d) / "janeaustenr" / "data" / "Rdata"
        if stem.with_suffix(".rdx").is_file():
            return stem
    raise TextsUnavailableError(f"the evaluation texts (Jane Austen's novels) are not installed; run: {INSTALL_HINT}")


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


def passage(tokenizer: Any, novel: str, start: int, min_tokens: int) -> list[str]:
    """Consecutive paragraphs of ``novel`` from paragraph ``start`` until ``min_tokens`` tokens."""
    paras = novels()[novel]
    taken: list[str] = []
    count = 0
    i = start
    while count < min_tokens:
        para = paras[i % len(paras)]
        taken.append(para)
        count += len(tokenizer(para + "\n\n", add_special_tokens=False)["input_ids"])
        i += 1
    return taken


def token_documents(tokenizer: Any, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` token sequences of exactly ``length`` tokens, each from a different novel
    (cycling) at a seeded paragraph offset: the documents of the perplexity task."""
    rng = random.Random(seed)
    docs = []
    for k in range(count):
        novel = NOVELS[k % len(NOVELS)]
        start = rng.randrange(len(novels()[novel]))
        text = "\n\n".join(passage(tokenizer, novel, start, length + 16))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        docs.append(ids)
    return docs


def haystack(tokenizer: Any, tokens: int, rng: random.Random) -> list[str]:
    """Paragraphs of about ``tokens`` tokens from a random novel and offset (the needle's hay)."""
    novel = rng.choice(NOVELS)
    return passage(tokenizer, novel, rng.randrange(len(novels()[novel])), tokens)
