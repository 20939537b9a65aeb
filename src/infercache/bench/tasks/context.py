"""Build a task context of a target token length: instructions, then haystack text with needles in it."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .fitting import DEFAULT_TOLERANCE, count_tokens, fit_to_length, token_index_at_char, token_starts
from .haystack import Haystack, Needle, insert_needles

PREAMBLE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class BuiltContext:
    """A context and where its needles ended up.

    ``needle_offsets`` are character offsets in ``text``; ``needle_depths`` are measured in tokens: the
    fraction of the filler tokens (haystack without instructions and needles) that come before each needle.
    """

    text: str
    n_tokens: int
    needle_offsets: list[int]
    needle_depths: list[float]
    filler: str
    filler_start_word: int


def build_context(
    tokenizer,
    length_tokens: int,
    needles: list[Needle],
    *,
    preamble: str,
    filler: str,
    rng: random.Random,
    tolerance: float = DEFAULT_TOLERANCE,
) -> BuiltContext:
    """``preamble`` + blank line + filler excerpt holding ``needles``, ``length_tokens`` long (± tolerance)."""
    haystack = Haystack.load(filler)
    start_word = rng.choice(haystack.paragraph_starts)
    head = preamble + PREAMBLE_SEPARATOR if preamble else ""

    def render(n_words: int) -> tuple[str, list[int]]:
        body, offsets = insert_needles(haystack.excerpt(start_word, n_words), needles)
        return head + body, [len(head) + offset for offset in offsets]

    (text, offsets), n_tokens = fit_to_length(
        render,
        lambda rendered: count_tokens(tokenizer, rendered[0]),
        length_tokens,
        max_units=2 * length_tokens + 16,
        tolerance=tolerance,
        what=f"a {filler} haystack context",
    )
    depths = _measured_depths(tokenizer, text, len(head), offsets, [count_tokens(tokenizer, n.text) for n in needles])
    return BuiltContext(text, n_tokens, offsets, depths, filler, start_word)


def _measured_depths(tokenizer, text: str, body_char: int, offsets: list[int], needle_tokens: list[int]) -> list[float]:
    """Fraction of filler tokens before each needle (needle tokens themselves not counted)."""
    starts = token_starts(tokenizer, text)
    body_start = token_index_at_char(starts, body_char)
    filler_tokens = max(1, len(starts) - body_start - sum(needle_tokens))
    depths = []
    for offset in offsets:
        before = token_index_at_char(starts, offset) - body_start
        before -= sum(n for other, n in zip(offsets, needle_tokens) if other < offset)
        depths.append(min(1.0, max(0.0, before / filler_tokens)))
    return depths
