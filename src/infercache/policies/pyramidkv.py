"""``pyramidkv``: SnapKV scores with a pyramid of per-layer budgets (more in lower layers).

Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
https://arxiv.org/abs/2406.02069. With ``B`` the average capacity per layer (including the window ``w``),
``N`` compressed layers and ``beta=20``: ``min = (B-w)//beta``, ``max = 2(B-w) - min`` (clamped to
``L-w``, then ``min = 2(B-w) - max``), ``step = (max-min)/(N-1)``, layer ``l`` keeps
``round(max - l*step)`` scored entries plus the window. The authors' code floors ``step``, which leaves the
last layer above ``min`` and the average above the budget (by 12.5 tokens at B=128, N=30); we keep the
paper's intent, an arithmetic schedule whose average is the budget. Prompts shorter than ``2(B-w)`` fall back to uniform SnapKV, as in the
authors' code. Defaults follow their LongBench runner: ``window=8``, ``kernel=7``, ``pooling="max"``.
Unlike kvpress, the unequal layer lengths are real and survive later multi-token forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreContext
from .snapkv import SnapKV


def pyramid_capacity(avg: int, window: int, length: int, rank: int, num_layers: int, beta: int) -> int:
    """Entries kept by the layer of rank ``rank`` (window included) for one sequence."""
    if length <= avg:
        return length
    base = avg - window
    if length < 2 * base or num_layers < 2 or base <= 0:
        return avg
    lo = base // beta
    hi = 2 * base - lo
    if hi >= length - window:
        hi = length - window
        lo = 2 * base - hi
    step = (hi - lo) / (num_layers - 1)  # the authors' code floors this; see the module docstring
    return max(1, min(length, round(hi - rank * step) + window))


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scoring with the PyramidKV layer schedule (beta=20, window 8, kernel 7, max pooling)."""

    window: int = 8
    beta: int = 20
    name = "pyramidkv"

    def layer_capacities(self, capacity: torch.Tensor, lengths: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        caps = [
            pyramid_capacity(int(c), self.window, int(n), ctx.layer_rank, ctx.num_ranked, self.beta)
            for c, n in zip(capacity.tolist(), lengths.tolist())
        ]
        return torch.tensor(caps, dtype=torch.long)
