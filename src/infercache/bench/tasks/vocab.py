"""Word lists the task generators draw from (keys, names, places, goods, coded words)."""

from __future__ import annotations

import functools
import random
import re
import string

ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "copper", "crimson",
    "curious", "dusty", "eager", "electric", "emerald", "fierce", "frozen", "gentle", "gilded", "golden",
    "hidden", "hollow", "humble", "icy", "ivory", "jolly", "lively", "lonely", "lucky", "marble",
    "mellow", "misty", "modest", "noble", "orange", "patient", "polished", "proud", "purple", "quiet",
    "rapid", "restless", "rusty", "scarlet", "secret", "silent", "silver", "sleepy", "smooth", "sparkling",
    "steady", "stormy", "sturdy", "sunny", "swift", "tender", "tiny", "velvet", "wandering", "wooden",
)

NOUNS = (
    "anchor", "apple", "badger", "banner", "basket", "beacon", "bicycle", "blanket", "bridge", "bucket",
    "button", "candle", "canyon", "carpet", "castle", "cactus", "cellar", "chimney", "cloud", "compass",
    "cottage", "crayon", "dolphin", "engine", "falcon", "feather", "fiddle", "garden", "giraffe", "glacier",
    "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "magnet",
    "meadow", "mirror", "monkey", "mountain", "needle", "orchard", "otter", "paddle", "parrot", "pebble",
    "pencil", "pepper", "piano", "pillow", "pocket", "puzzle", "rabbit", "ribbon", "river", "rocket",
    "saddle", "sandal", "scooter", "shovel", "spider", "spoon", "squirrel", "statue", "teapot", "tiger",
    "tractor", "trumpet", "tunnel", "turtle", "umbrella", "violin", "wagon", "walnut", "window", "zebra",
)

FIRST_NAMES = (
    "Alice", "Bruno", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ingrid", "Jonas",
    "Karla", "Leon", "Maya", "Nora", "Oscar", "Paula", "Quentin", "Rosa", "Stefan", "Tara",
    "Ulrich", "Vera", "Walter", "Xenia", "Yusuf", "Zara", "Amos", "Bianca", "Cyril", "Delia",
)

# Invented place names, so that no model knows anything about them beforehand.
TOWNS = (
    "Abbotsmere", "Brindlewick", "Caldermoor", "Dunhollow", "Elmsbridge", "Farrowgate", "Glenmarrow",
    "Haverthorn", "Ivydale", "Kestrelby", "Larkspur Ford", "Marrowdeep", "Nettlecombe", "Oakhaven",
    "Pennywhistle", "Quillford", "Ravenscar", "Saltmarsh", "Thistlewood", "Umberlee", "Vellhaven",
    "Wrenfield", "Yarrowby", "Zephyr Hollow",
)

# What a town is famous for: concrete, unambiguous, one or two words.
SPECIALTIES = (
    "blue cheese", "glass bells", "wool blankets", "honey cakes", "copper kettles", "paper kites",
    "clay pipes", "silk ribbons", "apple cider", "wooden clocks", "salted fish", "straw hats",
    "brass buttons", "lavender soap", "rope ladders", "plum jam", "leather boots", "candle wax",
    "pine furniture", "walnut bread", "tin whistles", "stone bridges", "rose gardens", "pickled onions",
)

STOPWORDS = frozenset(
    "that this with from have were what when which their there then than they them these those shall "
    "hath thou thee thine thy your yours unto upon whom whose will would could should into onto also "
    "some such more most much many very only been being here where while again ever never every other "
    "after before under over each both though through without within about above below".split()
)


def key_phrases(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct ``adjective-noun`` keys (e.g. ``silver-harbor``)."""
    if count > len(ADJECTIVES) * len(NOUNS):
        raise ValueError(f"cannot make {count} distinct keys")
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in keys:
            keys.append(key)
    return keys


def numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` distinct numbers of exactly ``digits`` digits, as strings."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low, high = 10 ** (digits - 1), 10**digits - 1
    if count > high - low + 1:
        raise ValueError(f"cannot make {count} distinct {digits}-digit numbers")
    return [str(n) for n in rng.sample(range(low, high + 1), count)]


def variable_names(rng: random.Random, count: int, length: int = 5) -> list[str]:
    """``count`` distinct upper-case variable names such as ``QPKTE``."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        if name not in names:
            names.append(name)
    return names


def coded_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct pronounceable nonsense words (consonant-vowel syllables), e.g. ``dobefa``."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        syllables = rng.randint(2, 3)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


@functools.lru_cache(maxsize=None)
def literary_words() -> tuple[str, ...]:
    """Distinct lower-case words (4-9 letters, no common function words) from the literary filler, sorted."""
    from .haystack import filler_text

    words = set(re.findall(r"(?<![\w'-])[a-z]{4,9}(?![\w'-])", filler_text("literary")))
    return tuple(sorted(words - STOPWORDS))
