"""Keys and values of the needles: ``adjective-noun`` keys and 7-digit numbers, as RULER draws them.

Why our own short lists: RULER takes its keys from the ``wonderwords`` package, which is not a
dependency here; 48 x 48 pairs give 2,304 keys, far more than any sample needs (at most 4),
and hyphenated pairs almost never occur in prose, so a key is found only where it was put.
"""

from __future__ import annotations

import random
import string

ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "copper", "crimson", "curious",
    "dusty", "eager", "early", "fancy", "fierce", "gentle", "golden", "grand", "green", "hidden", "hollow",
    "humble", "icy", "jolly", "kind", "lazy", "little", "lively", "lucky", "misty", "modest", "noble", "odd",
    "pale", "proud", "quiet", "rapid", "royal", "rusty", "silent", "silver", "sleepy", "steady", "swift",
    "tidy", "velvet", "wild",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "basket", "beacon", "bottle", "bridge", "candle", "canyon", "castle",
    "cobweb", "compass", "cottage", "dragon", "falcon", "feather", "fiddle", "garden", "giraffe", "harbor",
    "helmet", "island", "kettle", "ladder", "lantern", "meadow", "mirror", "needle", "orchard", "otter",
    "parrot", "pebble", "pepper", "pillow", "pirate", "rabbit", "saddle", "scissors", "tiger", "trumpet",
    "tunnel", "turnip", "violin", "wagon", "walnut", "window", "wizard",
)


def key(rng: random.Random) -> str:
    """A needle key such as ``silver-lantern``."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random, digits: int = 7) -> str:
    """A number of exactly ``digits`` digits (no leading zero)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def variable(rng: random.Random, letters: int = 5) -> str:
    """An upper-case variable name for variable tracking (``VAR QXJTB = ...``)."""
    return "".join(rng.choices(string.ascii_uppercase, k=letters))


def coded_word(rng: random.Random, letters: int = 6) -> str:
    """A made-up lower-case word for frequent-word extraction."""
    return "".join(rng.choices(string.ascii_lowercase, k=letters))


def distinct(draw, rng: random.Random, count: int, avoid: str = "") -> list[str]:
    """``count`` distinct draws of ``draw(rng)``, none a substring of another nor found in ``avoid``."""
    out: list[str] = []
    for _ in range(1000 * count):
        if len(out) == count:
            break
        item = draw(rng)
        if item in avoid or any(item in o or o in item for o in out):
            continue
        out.append(item)
    if len(out) < count:
        raise ValueError(f"could not draw {count} distinct items")
    return out
