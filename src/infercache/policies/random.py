"""``random``: uniform random scores, the floor any method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, ScoreContext


@dataclass
class Random(Policy):
    """Random eviction: each entry gets a uniform score, seeded per layer (``seed`` default 0)."""

    seed: int = 0
    name = "random"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100003 + ctx.layer_idx)
        return torch.rand(ctx.valid.shape, generator=gen).to(ctx.keys.device)
