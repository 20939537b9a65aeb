"""``full``: keep every entry (the uncompressed reference, through the same engine)."""

from __future__ import annotations

import torch

from .base import Policy, ScoreContext


class Full(Policy):
    """Keep everything: no scoring, the budget is ignored (always the whole context)."""

    name = "full"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.zeros(ctx.valid.shape, dtype=torch.float32, device=ctx.keys.device)
