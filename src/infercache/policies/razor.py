"""``razor``: RazorAttention, full caches for retrieval heads, sinks + recent + one compensation token elsewhere.

Tang et al. 2024, "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads",
https://arxiv.org/abs/2407.15891 (ICLR 2025; no code released; Huawei's msmodelslim / MindIE tools are the
reference we follow). Heads are profiled once per model (:mod:`.razor_heads`: top 14% by induction score
plus top 1% by echo score keep their full cache). Every other KV head keeps ``n_sink=4`` sink tokens, the
most recent ``L_h`` tokens and **one compensation token**: the mean of the dropped keys and values, attended
as if it stood ``|D|`` times (a ``+ln|D|`` logit offset, the paper's eq. 5). Compression happens once at
prefill, only when the prompt is longer than ``n_sink + L_h``; the cache grows while decoding.

``budget`` sets ``L_h`` (a fraction of the prompt, or tokens). The authors' rule is
``L_h = max(4000, N // 5)``: ``budget=0.2`` with ``min_window=4000``; our ``min_window`` defaults to 0 because
the reference models here have 1K-32K contexts where a 4,000-token floor would compress nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import Policy, ScoreContext


@dataclass
class RazorAttention(Policy):
    """Retrieval heads keep everything; other heads keep sinks, a recent window and a compensation token."""

    n_sink: int = 4
    min_window: int = 0
    compensation: bool = True
    heads: str | dict | None = None  # a profile (dict or JSON path); None: the saved one, else profile now
    induction_ratio: float = 0.14
    echo_ratio: float = 0.01
    name = "razor"
    _retrieval: set = field(default_factory=set, repr=False)

    def prepare(self, model) -> None:
        import json

        from .razor_heads import load_or_profile

        if isinstance(self.heads, dict):
            profile = self.heads
        elif isinstance(self.heads, str):
            profile = json.loads(open(self.heads).read())
        else:
            profile = load_or_profile(model, induction_ratio=self.induction_ratio, echo_ratio=self.echo_ratio)
        self.profile = profile
        self._retrieval = {(int(l), int(h)) for l, h in profile["retrieval_heads"]}

    def _is_retrieval(self, layer: int, head: int) -> bool:
        return (layer, head) in self._retrieval

    def _window(self, capacity: int, length: int) -> int:
        return max(self.min_window, capacity)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        rank = (torch.cumsum(ctx.valid.long(), -1) - 1).float()
        protected = ctx.valid & (rank <= self.n_sink)  # sinks, and slot n_sink that becomes the compensation
        return torch.where(protected, torch.full_like(rank, float("inf")), rank)

    def head_capacities(self, scores: torch.Tensor, capacity: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        n_valid = ctx.valid.sum(-1).cpu()  # [B, Hkv]
        caps = n_valid.clone()
        for row in range(caps.shape[0]):
            window = self._window(int(capacity[row]), int(n_valid[row, 0]))
            for head in range(caps.shape[1]):
                n = int(n_valid[row, head])
                if self._is_retrieval(ctx.layer_idx, head) or n <= self.n_sink + window + 1:
                    continue
                caps[row, head] = self.n_sink + int(self.compensation) + window
        return caps

    def merge(self, ctx: ScoreContext, keep: torch.Tensor, counts: torch.Tensor) -> dict | None:
        if not self.compensation:
            return None
        keys, values = ctx.keys.clone(), ctx.values.clone()
        bias = torch.zeros(ctx.valid.shape, dtype=torch.float32, device=keys.device)
        n_valid = ctx.valid.sum(-1)
        rank = torch.cumsum(ctx.valid.long(), -1) - 1
        for row in range(keys.shape[0]):
            for head in range(keys.shape[1]):
                n, kept = int(n_valid[row, head]), int(counts[row, head])
                if kept >= n:
                    continue  # retrieval head, or nothing dropped
                window = kept - self.n_sink - 1
                dropped = ctx.valid[row, head] & (rank[row, head] >= self.n_sink) & (rank[row, head] < n - window)
                slot = int(torch.nonzero(ctx.valid[row, head] & (rank[row, head] == self.n_sink))[0])
                d = int(dropped.sum())
                keys[row, head, slot] = keys[row, head][dropped].float().mean(0).to(keys.dtype)
                values[row, head, slot] = values[row, head][dropped].float().mean(0).to(values.dtype)
                bias[row, head, slot] = math.log(d)
        return {"k": keys, "v": values, "bias": bias}
