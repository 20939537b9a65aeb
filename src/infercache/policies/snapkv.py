"""``snapkv``: observation-window voting with pooling.

Li et al. 2024, "SnapKV: LLM Knows What You Are Looking for Before Generation",
https://arxiv.org/abs/2404.14469. The last ``window`` prompt queries vote (softmax attention, summed) for
earlier keys; votes are smoothed with a 1-D pool and each KV head keeps its top entries plus the window.
Defaults follow the paper's LongBench configs: ``window=32``, ``kernel=7``, ``pooling="max"``. The budget
*includes* the window (the authors' ``max_capacity_prompt``). GQA: scores are averaged over the query group
(``gqa_reduce="mean"``, the GQA variant of SnapKV issue #22 and kvpress); the original repeats KV per query
head, which stores g times more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Policy, ScoreContext, reduce_group, window_attention


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D smoothing over entries with stride 1 and ``kernel // 2`` padding (avg counts the zero pads)."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif pooling == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    return out[..., : shape[-1]].reshape(shape)


@dataclass
class SnapKV(Policy):
    """Window queries vote for keys; votes pooled; top entries per KV head plus the window."""

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa_reduce: str = "mean"
    name = "snapkv"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        window = min(self.window, ctx.queries.shape[2])
        votes = window_attention(ctx, window).sum(2)  # [B, H, L]
        votes = reduce_group(votes, ctx.num_kv_heads, self.gqa_reduce)
        return pool_scores(votes, self.kernel, self.pooling)
