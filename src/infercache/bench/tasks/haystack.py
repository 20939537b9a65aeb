"""Haystack filler text and needle insertion, all offline and deterministic.

Three fillers:

* ``literary`` (default): public-domain Milton and Shakespeare shipped in ``infercache/bench/data``
  (see its README.txt). Unrelated to any question the tasks ask, and free of digits.
* ``pydoc``: CPython's ``pydoc_data.topics``. About Python, so SmolLM2 confuses a "pass key" with
  Python topics; kept as an alternative, not a default.
* ``repeat``: RULER's classic "The grass is green. The sky is blue. ..." noise.

The filler is read as a cyclic stream of words; an excerpt starts at a seed-chosen paragraph and needles
are inserted at line or sentence boundaries, at a requested depth (fraction of the excerpt, 0..1).
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
LITERARY_FILES = ("milton_areopagitica.txt", "shakespeare_sonnets.txt", "milton_paradise_lost_1-4.txt")
FILLERS = ("literary", "pydoc", "repeat")

REPEAT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_WORD = re.compile(r"\S+")
# Where a needle may go, best first: a line or sentence start, then a clause start, then any word start.
_BOUNDARY_LEVELS = (re.compile(r"\n+|(?<=[.!?])[ ]+"), re.compile(r"(?<=[,;:])[ ]+"), re.compile(r"[ ]+"))
# A coarser boundary is used only when the best one is further than this from the requested spot
# (at most MAX_SNAP_CHARS characters and MAX_SNAP_FRACTION of the text, but always MIN_SNAP_CHARS).
MAX_SNAP_CHARS = 120
MAX_SNAP_FRACTION = 0.01
MIN_SNAP_CHARS = 20


class UnknownFillerError(ValueError):
    """Raised for a filler name that is not one of ``FILLERS``."""


@functools.lru_cache(maxsize=None)
def filler_text(name: str) -> str:
    """The full text of a filler (cached)."""
    if name == "literary":
        return "\n\n".join((DATA_DIR / f).read_text(encoding="utf-8").strip() for f in LITERARY_FILES)
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key].strip() for key in sorted(topics))
    if name == "repeat":
        return REPEAT_NOISE
    raise UnknownFillerError(f"unknown filler {name!r}; choose one of {', '.join(FILLERS)}")


@dataclass(frozen=True)
class Needle:
    """A sentence to hide in the haystack at ``depth`` (fraction 0..1 of the filler excerpt)."""

    text: str
    depth: float


class Haystack:
    """A filler viewed as a cyclic word stream (load it with :meth:`load`, which caches)."""

    def __init__(self, name: str, text: str):
        self.name = name
        self.text = text
        spans = [m.span() for m in _WORD.finditer(text)]
        if not spans:
            raise ValueError(f"filler {name!r} has no words")
        self.word_starts = [s for s, _ in spans]
        self.word_ends = [e for _, e in spans]
        # Word indices that begin a paragraph (or the text): natural starting points for an excerpt.
        self.paragraph_starts = [0] + [
            i for i in range(1, len(spans)) if "\n\n" in text[self.word_ends[i - 1] : self.word_starts[i]]
        ]
        self.wrap_separator = "\n\n" if "\n" in text else " "

    @classmethod
    @functools.lru_cache(maxsize=None)
    def load(cls, name: str) -> "Haystack":
        return cls(name, filler_text(name))

    @property
    def n_words(self) -> int:
        return len(self.word_starts)

    def excerpt(self, start_word: int, n_words: int) -> str:
        """``n_words`` words from ``start_word`` on, wrapping around the end (after a paragraph break)."""
        if n_words <= 0:
            return ""
        pieces = []
        start = start_word % self.n_words
        remaining = n_words
        while remaining > 0:
            take = min(remaining, self.n_words - start)
            pieces.append(self.text[self.word_starts[start] : self.word_ends[start + take - 1]])
            remaining -= take
            start = 0
        return self.wrap_separator.join(pieces)


def boundaries(text: str, level: int = 0) -> list[int]:
    """Character offsets where a needle may be inserted: 0, the end, and the starts of lines and
    sentences (``level`` 0), clauses (1) or words (2)."""
    points = {0, len(text)}
    points.update(m.end() for m in _BOUNDARY_LEVELS[level].finditer(text) if m.end() < len(text))
    return sorted(points)


def insert_needles(text: str, needles: list[Needle]) -> tuple[str, list[int]]:
    """Insert each needle at the boundary nearest its depth; return the new text and each needle's offset.

    Needles go at line or sentence starts unless none is near enough the requested spot (within
    ``MAX_SNAP_CHARS`` and ``MAX_SNAP_FRACTION`` of the text; Milton's sentences can be very long); then
    at a clause start, else at a word start.
    Offsets are in the returned text, in the order of ``needles``.
    """
    levels = [boundaries(text, level) for level in range(len(_BOUNDARY_LEVELS))]
    max_snap = max(MIN_SNAP_CHARS, min(MAX_SNAP_CHARS, MAX_SNAP_FRACTION * len(text)))
    placed = []
    for order, needle in enumerate(needles):
        if not 0.0 <= needle.depth <= 1.0:
            raise ValueError(f"needle depth must be within [0, 1], got {needle.depth}")
        target = needle.depth * len(text)
        for points in levels:
            point = _nearest(points, target)
            if abs(point - target) <= max_snap:
                break
        placed.append((point, order, needle))
    placed.sort(key=lambda item: (item[0], item[1]))
    out, offsets, cursor, shift = [], [0] * len(needles), 0, 0
    for point, order, needle in placed:
        out.append(text[cursor:point])
        before, after = _separators(text, point)
        piece = before + needle.text + after
        offsets[order] = point + shift + len(before)
        out.append(piece)
        shift += len(piece)
        cursor = point
    out.append(text[cursor:])
    return "".join(out), offsets


def _nearest(points: list[int], target: float) -> int:
    i = bisect.bisect_left(points, target)
    candidates = points[max(0, i - 1) : i + 1]
    return min(candidates, key=lambda p: (abs(p - target), p))


def _separators(text: str, point: int) -> tuple[str, str]:
    """Whitespace before and after a needle at ``point`` that keeps it a sentence or line of its own."""
    if not text:
        return "", ""
    if point >= len(text):
        return ("\n" if "\n" in text else " "), ""
    if point > 0 and text[point - 1] == "\n":
        return "", "\n"
    return "", " "
