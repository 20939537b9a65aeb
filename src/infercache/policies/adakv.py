"""``adakv``: head-adaptive budget allocation around any scorer (SnapKV by default).

Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation",
https://arxiv.org/abs/2407.11550. Inside a layer, take the global top ``Hkv*b`` scores over all KV heads
(``b`` = capacity minus the window), count how many each head owns (``c_h``), and give head ``h``
``round(c_h*(1-alpha) + int(alpha*b))`` entries plus the window. Defaults from the authors' runner:
``alpha=0.2``, SnapKV scorer with ``window=32``, ``kernel=7``, max pooling, GQA mean. Unlike kvpress's
AdaKVPress (which masks), each head here really holds only its own entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import NEG_INF, Policy, ScoreContext
from .snapkv import SnapKV


@dataclass
class AdaKV(Policy):
    """Head-adaptive split of each layer's budget, by where the scorer's global top entries fall."""

    scorer: Policy = field(default_factory=SnapKV)
    alpha: float = 0.2
    name = "adakv"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        self.window = self.scorer.window
        self.decode_mode = self.scorer.decode_mode
        self.skip_layers = self.scorer.skip_layers

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.scorer.score(ctx)

    def recent_to_protect(self, capacity: int) -> int:
        return self.scorer.recent_to_protect(capacity)

    def head_capacities(self, scores: torch.Tensor, capacity: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        b_rows, heads, length = scores.shape
        window = min(self.window, length)
        caps = torch.empty(b_rows, heads, dtype=torch.long)
        n_valid = ctx.valid.sum(-1)  # [B, Hkv]
        for row in range(b_rows):
            base = int(capacity[row]) - window
            valid_len = int(n_valid[row].min())
            if base <= 0 or int(capacity[row]) >= valid_len:
                caps[row] = int(capacity[row])
                continue
            prefix = scores[row, :, : length - window].clone()
            prefix = prefix.masked_fill(~ctx.valid[row, :, : length - window], NEG_INF)
            top = torch.topk(prefix.reshape(-1), heads * base).indices // prefix.shape[-1]
            owned = torch.bincount(top, minlength=heads).float()
            floor = int(self.alpha * base)
            caps[row] = torch.round(owned * (1 - self.alpha) + floor).long() + window
        return torch.minimum(caps, n_valid.cpu())
