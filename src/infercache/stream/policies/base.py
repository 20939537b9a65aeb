"""The stream policy contract: which held entries survive when new input arrives, and what a question sees.

A policy works on :class:`~infercache.stream.entries.Entries` (stream order, modality, chunk) and returns the
indices to keep; the stream then evicts them from every layer and re-positions the survivors. ``budget`` is the
number of KV entries held per layer (every layer holds the same entries, but local sliding-window layers, which
hold a subset: :attr:`StreamPolicy.evicts_oldest`); between calls the cache never holds more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..entries import Entries
from ..errors import StreamBudgetError

if TYPE_CHECKING:  # pragma: no cover
    from ..stream import Stream


@dataclass
class StreamPolicy:
    """Base class: subclasses set ``name`` and implement :meth:`select`."""

    sinks: int = 4
    name: ClassVar[str] = "base"

    def setup(self, budget: int, stream: "Stream") -> None:
        """Check the budget against the policy's needs; called once by ``infercache.stream.open``."""
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise StreamBudgetError(f"{self.name}: sinks must be an int >= 0, got {self.sinks!r}")
        if budget <= self.sinks:
            raise StreamBudgetError(
                f"{self.name}: budget ({budget}) must be larger than the {self.sinks} sink tokens it always keeps; "
                "raise the budget or lower sinks="
            )
        self.budget = budget

    #: Evictions keep the first ``sinks`` entries and drop only the oldest of the others (StreamingLLM, ReKV). Then a
    #: sliding-window layer may hold just the sinks and its window: no eviction can bring an older entry back into
    #: its window (StreamingVLM's typed cuts can, so its sliding layers hold everything).
    evicts_oldest: ClassVar[bool] = False

    def local_window_ok(self, window: int) -> bool:
        """Whether sliding-window layers of ``window`` may hold only the sinks and the newest ``window - 1`` entries
        with outputs unchanged (and memory saved)."""
        return self.evicts_oldest and window - 1 < self.budget - self.sinks

    def max_chunk(self, modality: int) -> int:
        """The most new tokens of ``modality`` one forward may bring (the stream splits text feeds to fit)."""
        return self.budget - self.sinks

    def select(self, entries: Entries, incoming: int, modality: int) -> torch.Tensor | None:
        """Sorted indices of held entries to keep before ``incoming`` new tokens arrive (``None``: keep all)."""
        raise NotImplementedError

    def evict(self, stream: "Stream", drop: torch.Tensor) -> None:
        """Called with the indices about to be dropped, before they are (ReKV offloads them)."""

    def begin_ask(self, stream: "Stream") -> tuple[int, int]:
        """Prepare a question; returns ``(shift_from, shift)``: held entries from ``shift_from`` on are moved by
        ``shift`` positions for the question (room for retrieved blocks)."""
        return 0, 0

    def end_ask(self, stream: "Stream") -> None:
        """Release what the question used."""

    def nbytes(self) -> int:
        """Bytes the policy itself holds in RAM (ReKV's block summaries)."""
        return 0

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        """Release resources (ReKV's store)."""


def keep_all_but(n: int, drop: torch.Tensor) -> torch.Tensor:
    """Indices ``0..n-1`` without ``drop``."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[drop] = False
    return torch.nonzero(mask).flatten()
