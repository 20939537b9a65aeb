"""Answer scoring and logit-level fidelity metrics for ``infercache bench``.

Answer scoring (used by the tasks): text is normalised (case, whitespace) and an answer counts as
found when it appears in the prediction as a whole word or number (``71432`` is not found in ``714321``).

Fidelity metrics compare a compressed run with the full-cache reference and work even where a model is
too weak to solve a task: ``kl_divergence`` and ``top1_agreement`` on logits of the same positions
(teacher forcing), and ``greedy_token_match`` on generated token ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "normalize_text",
    "exact_match",
    "contains_match",
    "recall_match",
    "kl_divergence",
    "top1_agreement",
    "GreedyMatch",
    "greedy_token_match",
    "fidelity_text",
]


# ---------------------------------------------------------------------------------------------- answers


def normalize_text(text: str) -> str:
    """Lower-case and collapse runs of whitespace into single spaces."""
    return " ".join(text.lower().split())


def _found(answer: str, prediction: str) -> bool:
    needle = normalize_text(answer)
    if not needle:
        raise ValueError("empty answer")
    return re.search(rf"(?<![\w]){re.escape(needle)}(?![\w])", prediction) is not None


def _answers(answers: str | Sequence[str]) -> list[str]:
    listed = [answers] if isinstance(answers, str) else list(answers)
    if not listed:
        raise ValueError("no reference answers given")
    return listed


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals one of the answers (trailing ``.`` ignored), else 0.0."""
    pred = normalize_text(prediction).rstrip(".")
    return float(any(pred == normalize_text(a).rstrip(".") for a in _answers(answers)))


def contains_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if any answer appears in the prediction as a whole word/number, else 0.0."""
    pred = normalize_text(prediction)
    return float(any(_found(a, pred) for a in _answers(answers)))


def recall_match(prediction: str, answers: str | Sequence[str]) -> float:
    """Fraction of the answers that appear in the prediction (multi-value tasks)."""
    pred = normalize_text(prediction)
    listed = _answers(answers)
    return sum(_found(a, pred) for a in listed) / len(listed)


# --------------------------------------------------------------------------------------------- fidelity


def _as_logits(logits, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(logits)
    if tensor.ndim == 0:
        raise ValueError(f"{name} must have a vocabulary dimension, got a scalar")
    return tensor.detach().to(torch.float64)


def _check_shapes(ref: torch.Tensor, test: torch.Tensor) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"logit shapes differ: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")
    if ref.numel() == 0:
        raise ValueError("empty logits")


def kl_divergence(ref_logits, test_logits) -> float:
    """Mean over positions of KL(P_ref || P_test), in nats.

    Both inputs have shape ``(..., vocab)`` (e.g. ``(batch, seq, vocab)``); every leading index is a
    position. Computed in float64 from ``log_softmax``, so large logits do not overflow.
    """
    ref, test = _as_logits(ref_logits, "ref_logits"), _as_logits(test_logits, "test_logits")
    _check_shapes(ref, test)
    log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(test, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)
    return float(per_position.mean())


def top1_agreement(ref_logits, test_logits) -> float:
    """Fraction of positions where both logits pick the same top-1 token."""
    ref, test = _as_logits(ref_logits, "ref_logits"), _as_logits(test_logits, "test_logits")
    _check_shapes(ref, test)
    return float((ref.argmax(dim=-1) == test.argmax(dim=-1)).to(torch.float64).mean())


@dataclass(frozen=True)
class GreedyMatch:
    """Position-by-position comparison of two generated id sequences.

    ``match_fraction``: positions where both agree, over the reference length (positions the test run
    did not produce count as mismatches). ``first_divergence``: the first index where they differ or
    one sequence ends before the other, ``None`` when identical. ``n_positions``: reference length.
    """

    match_fraction: float
    first_divergence: int | None
    n_positions: int


def greedy_token_match(ref_ids, test_ids) -> GreedyMatch:
    """Compare greedy outputs (1-D sequences of token ids, lists or tensors) of a reference and a test run."""
    ref, test = _as_id_list(ref_ids, "ref_ids"), _as_id_list(test_ids, "test_ids")
    matches = sum(a == b for a, b in zip(ref, test))
    first = next((i for i, (a, b) in enumerate(zip(ref, test)) if a != b), None)
    if first is None and len(ref) != len(test):
        first = min(len(ref), len(test))
    fraction = matches / len(ref) if ref else float(not test)
    return GreedyMatch(fraction, first, len(ref))


def _as_id_list(ids, name: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(f"{name} must be one sequence (1-D, or 2-D with batch 1), got {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]


def fidelity_text(
    n_chars: int | None = 4000,
    *,
    tokenizer=None,
    n_tokens: int | None = None,
    seed: int = 0,
    filler: str = "literary",
) -> str:
    """A deterministic natural-text passage from the shipped haystack data, for teacher-forced runs.

    Give ``n_chars`` (cut at a word end, at most that many characters), or ``tokenizer`` and ``n_tokens``
    (the longest whole-word passage of at most ``n_tokens`` tokens). ``seed`` picks the starting paragraph.
    """
    import random

    from .tasks.fitting import count_tokens
    from .tasks.haystack import Haystack

    haystack = Haystack.load(filler)
    starts = haystack.paragraph_starts
    start = starts[random.Random(f"fidelity/{seed}").randrange(len(starts))]
    if n_tokens is not None:
        if tokenizer is None:
            raise ValueError("n_tokens needs a tokenizer")
        if n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        lo, hi = 0, 2 * n_tokens + 16
        while lo < hi:  # the largest word count whose text fits in n_tokens
            mid = (lo + hi + 1) // 2
            if count_tokens(tokenizer, haystack.excerpt(start, mid)) <= n_tokens:
                lo = mid
            else:
                hi = mid - 1
        return haystack.excerpt(start, lo)
    if n_chars is None or n_chars <= 0:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    text = haystack.excerpt(start, n_chars)  # a word is at least one character
    cut = max(text.rfind(" ", 0, n_chars + 1), text.rfind("\n", 0, n_chars + 1)) if len(text) > n_chars else len(text)
    return text[: cut if cut > 0 else n_chars].rstrip()
