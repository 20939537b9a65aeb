"""``streaming_llm``: attention sinks plus the most recent tokens.

StreamingLLM, Xiao et al. 2023, https://arxiv.org/abs/2309.17453. Authors' defaults: ``start_size=4`` sinks
and a recent window (``recent_size=2000`` in their demo); here the recent window is the rest of the budget,
so ``budget`` counts the sinks. The authors cache keys before RoPE and re-position them inside the window;
this compression engine keeps original positions (invariant of the core cache) and evicts at every decode
step, which is the kvpress-style variant. The re-positioning streaming mode belongs to ``infercache.stream``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, ScoreContext


@dataclass
class StreamingLLM(Policy):
    """Sinks + recent window: keep the first ``n_sink`` entries and the newest ones (default 4 sinks)."""

    n_sink: int = 4
    name = "streaming_llm"
    decode_mode = "evict"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        length = ctx.valid.shape[-1]
        # Rank of an entry among the real ones of its head: entries are stored in chronological order.
        rank = torch.cumsum(ctx.valid.long(), dim=-1) - 1
        recency = torch.arange(length, dtype=torch.float32, device=ctx.keys.device).expand(ctx.valid.shape)
        return torch.where(rank < self.n_sink, torch.full_like(recency, float(2 * length)), recency)
