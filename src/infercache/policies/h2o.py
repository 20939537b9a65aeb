"""``h2o``: heavy hitters (accumulated attention) plus recent tokens.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", https://arxiv.org/abs/2306.14048. The score of an entry is
the attention it has received, summed over every query so far (all prompt queries at prefill, plus each
decode query), per head; GQA groups are averaged. The budget is split between heavy hitters and the
recent window; the authors use 10% heavy + 10% recent, i.e. an even split: ``recent_fraction=0.5``.
Eviction runs at prefill and during decoding (the budget holds), as in the authors' real-drop code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NEG_INF, Policy, ScoreContext, reduce_group


@dataclass
class H2O(Policy):
    """Accumulated attention (heavy hitters) + recent window, evicting during decode too."""

    recent_fraction: float = 0.5
    gqa_reduce: str = "mean"
    query_chunk: int = 256
    name = "h2o"
    decode_mode = "evict"
    needs_decode_attention = True
    needs_all_queries = True

    def recent_to_protect(self, capacity: int) -> int:
        return int(capacity * self.recent_fraction)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.phase == "decode":
            return ctx.stats["acc"]
        return reduce_group(column_attention_sums(ctx, self.query_chunk), ctx.num_kv_heads, self.gqa_reduce)


def column_attention_sums(ctx: ScoreContext, chunk: int) -> torch.Tensor:
    """Sum over all prompt queries of their causal attention to each key: ``[B, H, L]`` (fp32, chunked)."""
    q_all = ctx.queries.float()
    b, h, length, _ = q_all.shape
    g = ctx.group_size
    k = ctx.keys.float().repeat_interleave(g, dim=1)
    valid = ctx.valid.repeat_interleave(g, dim=1)[:, :, None, :]
    total = torch.zeros(b, h, k.shape[2], dtype=torch.float32, device=k.device)
    offset = k.shape[2] - length
    keys_idx = torch.arange(k.shape[2], device=k.device)
    for start in range(0, length, chunk):
        q = q_all[:, :, start : start + chunk]
        logits = torch.matmul(q, k.transpose(-1, -2)) * ctx.scaling
        rows = offset + start + torch.arange(q.shape[2], device=k.device)
        causal = keys_idx[None, :] <= rows[:, None]
        mask = valid & causal
        probs = torch.softmax(logits.masked_fill(~mask, NEG_INF), dim=-1).nan_to_num(0.0)
        total += probs.sum(2)
    return total
