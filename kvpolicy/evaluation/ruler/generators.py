"""The RULER-style tasks: each draws its secrets from a seeded RNG and builds a prompt of any size.

Why two steps (``draw`` then ``build(n)``): the prompt must be fitted to a length in the model's
tokens, which means building it at several sizes ``n`` (haystack words, or list entries) and
tokenizing each. Everything random is drawn once, before, so the fitted prompt's keys, values and
depths do not depend on how many tries the fitting took.

The tasks follow RULER (Hsieh et al., 2024, github.com/NVIDIA/RULER): its needle sentence, its
questions and answer prefixes, its default complexities (4 keys, values or queries; one chain of
4 hops; 10 common words). Differences: the haystack is any prose (the --texts by default, RULER
uses Paul Graham's essays), keys come from :mod:`.words`, and the word lists of ``cwe`` and
``fwe`` are sized for the length (see each builder).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import words as w
from .haystack import Haystack, HaystackError, insert_at_depths, sentences

#: RULER inserts needles at one of 40 evenly spaced depths
DEPTHS = tuple(round(i / 39, 4) for i in range(40))
NEEDLE = "One of the special magic numbers for {key} is: {value}."


@dataclass(frozen=True)
class Draft:
    """One prompt before tokenization: the context (instructions + body) and the question apart."""

    preamble: str
    body: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    #: strings the task puts in the context exactly once (needles, the values asked for, assignments)
    once: tuple[str, ...] = ()
    #: word -> the number of list entries it has (word-list tasks)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def context(self) -> str:
        return self.preamble + self.body + "\n"


Builder = Callable[[int], Draft]


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to draw a sample, how many tokens its answer needs, and what ``n`` means."""

    name: str
    description: str
    draw: Callable[[random.Random, Haystack], Builder]
    max_new_tokens: int
    #: the smallest useful ``n`` (the fitting never goes below it)
    min_units: int = 0


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah(num_keys: int, num_values: int, num_queries: int) -> Callable[[random.Random, Haystack], Builder]:
    """RULER's needle tasks: ``num_keys`` keys (the unasked ones are distractors), ``num_values``
    values per key, ``num_queries`` keys asked for; every value of every asked key is expected."""

    def draw(rng: random.Random, hay: Haystack) -> Builder:
        doc, start = hay.start(rng)
        keys = w.distinct(w.key, rng, num_keys)
        values = w.distinct(w.number, rng, num_keys * num_values)
        needles = [NEEDLE.format(key=k, value=values[i * num_values + j])
                   for i, k in enumerate(keys) for j in range(num_values)]
        rng.shuffle(needles)
        depths = [rng.choice(DEPTHS) for _ in needles]
        asked = sorted(rng.sample(range(num_keys), num_queries))
        answers = tuple(values[i * num_values + j] for i in asked for j in range(num_values))
        query = _join_keys([keys[i] for i in asked])
        if num_values * num_queries == 1:
            preamble = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                        "I will quiz you about the number afterwards.\n")
            question = f"What is the special magic number for {query} mentioned in the provided text?"
            prefix = f"The special magic number for {query} mentioned in the provided text is"
        else:
            preamble = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                        "it. I will quiz you about the numbers afterwards.\n")
            question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
            prefix = f"The special magic numbers for {query} mentioned in the provided text are"

        def build(n: int) -> Draft:
            body = " ".join(insert_at_depths(sentences(hay.words(doc, start, n)), needles, depths))
            return Draft(preamble, body, question, prefix, answers, once=tuple(needles) + tuple(values))

        return build

    return draw


#: RULER's noise sentences, used here only in ``vt``'s worked example (the task's own noise is the haystack)
EXAMPLE_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(len(names) - 1)]


def _variable_tracking(hops: int = 4) -> Callable[[random.Random, Haystack], Builder]:
    """RULER's ``vt``: ``VAR A = 12345``, then ``VAR B = VAR A`` and so on for ``hops`` hops, the
    statements in order at random sentence boundaries; every variable holding the value is expected.
    As in RULER, a short worked example (3-letter names in RULER's noise sentences, with its answer)
    comes first."""

    def draw(rng: random.Random, hay: Haystack) -> Builder:
        doc, start = hay.start(rng)
        names = w.distinct(w.variable, rng, hops + 1)
        value, example_value = w.distinct(lambda r: w.number(r, 5), rng, 2)
        example_names = w.distinct(lambda r: w.variable(r, 3), rng, hops + 1, avoid=" ".join(names))
        chain = _chain(names, value)
        depths = sorted(rng.choice(DEPTHS) for _ in chain)
        noise = sentences((EXAMPLE_NOISE + " " + EXAMPLE_NOISE).split())
        example = " ".join(insert_at_depths(noise, _chain(example_names, example_value),
                                            sorted(rng.choice(DEPTHS) for _ in names)))

        def ask(v: str) -> tuple[str, str]:
            return (f"Question: Find all variables that are assigned the value {v} in the text above.",
                    f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                    f"variables are assigned the value {v}, they are:")

        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        example_q, example_a = ask(example_value)
        preamble = f"{intro}{example}\n{example_q} {example_a} {' '.join(example_names)}\n\n{intro}"
        question, prefix = ask(value)

        def build(n: int) -> Draft:
            body = " ".join(insert_at_depths(sentences(hay.words(doc, start, n)), chain, depths))
            once = tuple(chain) + tuple(f"VAR {v} =" for v in names)
            return Draft(preamble, body, question, prefix, tuple(names), once=once)

        return build

    return draw


#: ``cwe``: common words and how often each appears; RULER's 30 is for 4k+ tokens of Llama's
#: tokenizer, so it is scaled down to keep the common words near COMMON_SHARE of the entries
COMMON_WORDS, COMMON_FREQ, UNCOMMON_FREQ, COMMON_SHARE, TOKENS_PER_ENTRY = 10, 30, 3, 0.3, 5.5


def _common_words(length: int) -> Callable[[random.Random, Haystack], Builder]:
    """RULER's ``cwe``: a numbered list in which 10 words appear ``freq`` times and the others 3
    times; the 10 are expected. ``n`` is the number of entries of the other words (the last of them
    may have only 1 or 2, so that the list can grow by one entry, about 6 tokens, at a time)."""

    freq = max(UNCOMMON_FREQ + 2, min(COMMON_FREQ, round(COMMON_SHARE * length / TOKENS_PER_ENTRY / COMMON_WORDS)))

    def draw(rng: random.Random, hay: Haystack) -> Builder:
        vocab = hay.vocabulary
        if len(vocab) < COMMON_WORDS + 50:
            raise HaystackError(f"the haystack {hay.name!r} has {len(vocab)} distinct words; cwe needs at least "
                                f"{COMMON_WORDS + 50}: give a longer text or leave cwe out (--ruler-tasks)")
        preamble = ("Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n")
        question = f"Question: What are the {COMMON_WORDS} most common words in the above list?"
        prefix = f"Answer: The top {COMMON_WORDS} words that appear most often in the list are:"
        said = set(re.findall(r"[a-z]+", (preamble + question + prefix).lower()))
        pool = [word for word in rng.sample(vocab, len(vocab)) if word not in said]  # no answer in the question
        common = pool[:COMMON_WORDS]
        uncommon = pool[COMMON_WORDS:]
        order_seed = rng.random()

        def build(n: int) -> Draft:
            if n > len(uncommon) * UNCOMMON_FREQ:
                raise HaystackError(f"the haystack {hay.name!r} has too few distinct words for cwe at this length: "
                                    "give a longer text, a shorter --context, or leave cwe out (--ruler-tasks)")
            others = [uncommon[i // UNCOMMON_FREQ] for i in range(n)]
            entries = common * freq + others
            random.Random(f"{order_seed}:{n}").shuffle(entries)
            body = "\n".join(f"{i + 1}. {word}" for i, word in enumerate(entries))
            counts = {word: freq for word in common}
            for word in others:
                counts[word] = counts.get(word, 0) + 1
            return Draft(preamble, body, question, prefix, tuple(common), counts=counts)

        return build

    return draw


#: ``fwe``: word frequencies follow Zipf's law with this exponent (RULER's alpha)
ZIPF_ALPHA, FREQUENT_WORDS = 2.0, 3


def _frequent_words(rng: random.Random, hay: Haystack) -> Builder:
    """RULER's ``fwe``: a text of made-up words whose counts follow Zipf's law (rank ``k`` about
    ``n / k**2 / H``); the three most frequent are expected. ``n`` is the number of words. The
    counts are the law's, rounded (RULER samples them), so the top three never tie."""
    vocab = w.distinct(w.coded_word, rng, 400)
    order_seed = rng.random()
    preamble = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words.\n")
    question = ("Question: Do not provide any explanation. What are the three most frequently appeared words "
                "in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"

    def build(n: int) -> Draft:
        weights = [1 / (k + 1) ** ZIPF_ALPHA for k in range(len(vocab))]
        total = sum(weights)
        counts = {word: c for word, wt in zip(vocab, weights) if (c := round(n * wt / total)) > 0}
        entries = [word for word, c in counts.items() for _ in range(c)]
        random.Random(f"{order_seed}:{n}").shuffle(entries)
        body = " ".join(entries)
        return Draft(preamble, body, question, prefix, tuple(vocab[:FREQUENT_WORDS]), counts=counts)

    return build


def task_specs(length: int) -> dict[str, TaskSpec]:
    """Every task, sized for a target of ``length`` tokens (only ``cwe`` depends on it)."""
    return {
        "niah_single": TaskSpec("niah_single", "one needle, asked for its value", _niah(1, 1, 1), 24),
        "niah_multikey": TaskSpec("niah_multikey", "4 needles of different keys, one asked (3 distractors)",
                                  _niah(4, 1, 1), 24),
        "niah_multivalue": TaskSpec("niah_multivalue", "4 values of one key, all asked", _niah(1, 4, 1), 64),
        "niah_multiquery": TaskSpec("niah_multiquery", "4 keys of one value each, all asked", _niah(4, 1, 4), 64),
        "vt": TaskSpec("vt", "variable tracking: a chain of 4 hops, every variable asked", _variable_tracking(), 40),
        "cwe": TaskSpec("cwe", "common-word extraction: the 10 most common words of a list", _common_words(length),
                        80, min_units=1),
        "fwe": TaskSpec("fwe", "frequent-word extraction: the 3 most frequent made-up words (Zipf)",
                        _frequent_words, 32, min_units=100),
    }


TASK_NAMES = tuple(task_specs(4096))
