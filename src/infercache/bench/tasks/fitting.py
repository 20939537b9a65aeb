"""Fitting generated text to a target length measured in a model's tokens."""

from __future__ import annotations

import bisect
from typing import Callable, TypeVar

T = TypeVar("T")

DEFAULT_TOLERANCE = 0.02


class LengthFitError(ValueError):
    """Raised when no text of the requested token length can be built."""


def count_tokens(tokenizer, text: str) -> int:
    """Tokens in ``text`` alone (no special tokens): the unit every target length is measured in."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_starts(tokenizer, text: str) -> list[int]:
    """Character offset where each token of ``text`` starts (needs a fast tokenizer)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [start for start, _end in offsets]


def token_index_at_char(starts: list[int], char: int) -> int:
    """Index of the first token starting at or after character ``char``, given :func:`token_starts`."""
    return bisect.bisect_left(starts, char)


def fit_to_length(
    render: Callable[[int], T],
    measure: Callable[[T], int],
    target: int,
    max_units: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    what: str = "text",
) -> tuple[T, int]:
    """Pick the number of units ``n`` in ``[0, max_units]`` whose rendering is closest to ``target`` tokens.

    ``render(n)`` builds the text (or object) from ``n`` filler units and ``measure`` counts its tokens;
    token counts must grow with ``n`` (give or take merges at the edges). Returns ``(rendered, tokens)``.
    Raises :class:`LengthFitError` when the best fit is more than ``tolerance`` away from ``target``.
    """
    if target <= 0:
        raise LengthFitError(f"target length must be positive, got {target}")
    lo, hi = 0, max_units
    best_n, best = 0, None
    # Largest n whose length is <= target (binary search), then compare it with n + 1.
    while lo <= hi:
        mid = (lo + hi) // 2
        rendered = render(mid)
        tokens = measure(rendered)
        if tokens <= target:
            best_n, best = mid, (rendered, tokens)
            lo = mid + 1
        else:
            hi = mid - 1
    candidates = [best] if best is not None else []
    if best_n + 1 <= max_units:
        rendered = render(best_n + 1)
        candidates.append((rendered, measure(rendered)))
    if not candidates:
        raise LengthFitError(f"cannot build {what} of {target} tokens")
    rendered, tokens = min(candidates, key=lambda c: (abs(c[1] - target), c[1]))
    if abs(tokens - target) > tolerance * target:
        raise LengthFitError(
            f"cannot build {what} of {target} tokens (±{tolerance:.0%}): the closest has {tokens}; "
            "the fixed parts (instructions, needles) may be longer than the target"
        )
    return rendered, tokens
