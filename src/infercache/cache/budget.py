"""Budgets: a ratio of the context kept (``0 < r <= 1``) or an absolute number of tokens (``int >= 1``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """How many entries a layer keeps per sequence (before per-layer and per-head allocation).

    ``ratio`` keeps ``max(1, int(ratio * L))`` of the ``L`` real context tokens; ``tokens`` keeps
    ``min(tokens, L)``. A budget at or above the context keeps everything (identical to no compression).
    """

    ratio: float | None = None
    tokens: int | None = None

    @classmethod
    def parse(cls, budget) -> "Budget":
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, bool) or budget is None:
            raise ValueError(f"budget must be a ratio in (0, 1] or a positive int of tokens, got {budget!r}")
        if isinstance(budget, int):
            if budget < 1:
                raise ValueError(f"budget must be >= 1 token, got {budget}")
            return cls(tokens=budget)
        if isinstance(budget, float):
            if not 0.0 < budget <= 1.0:
                raise ValueError(
                    f"a float budget is the fraction of context kept and must be in (0, 1], got {budget}; "
                    "pass an int for an absolute number of tokens"
                )
            return cls(ratio=budget)
        raise ValueError(f"budget must be a float ratio or an int token count, got {type(budget).__name__}")

    def resolve(self, lengths: torch.Tensor) -> torch.Tensor:
        """Entries to keep for each sequence, given its real context length ``[B]``."""
        lengths = lengths.to(torch.long).cpu()
        if self.tokens is not None:
            return torch.clamp(lengths, max=self.tokens)
        kept = torch.floor(lengths.double() * self.ratio).long().clamp_min(1)
        return torch.minimum(kept, lengths)

    def __str__(self) -> str:
        return f"{self.ratio:g}" if self.ratio is not None else f"{self.tokens} tokens"
