"""``dapq``: decoding-aligned pseudo queries placed at the *future* positions.

DapQ, "Where Matters More Than What: Decoding-aligned KV Cache Compression via Position-aware Pseudo
Queries", https://arxiv.org/abs/2603.11564 (no public code). SnapKV-style voting, but the observation
window is replaced by pseudo queries that stand in for the answer tokens; the paper's finding is that
their *position* matters more than their content.

How we form the pseudo queries (the paper's exact construction was not available to us; this follows its
stated idea and is documented as our reconstruction):

1. content: the pre-RoPE queries of the last ``n_pseudo`` prompt tokens (recovered exactly by rotating the
   post-RoPE queries back by their own positions);
2. position: each is rotated again at ``L + offset + i`` for ``i = 0..n_pseudo-1``, where ``L`` is the
   prompt length, i.e. where the first generated tokens will sit (``offset=0``);
3. scores: their softmax attention over all prompt keys (no causal mask: they are all in the future),
   summed over the pseudo queries, averaged over the GQA group, max-pooled (kernel 7, as SnapKV's
   LongBench setting); the last ``recent_window`` prompt tokens are kept on top (inside the budget).

Defaults: ``n_pseudo=32``, ``offset=0``, ``recent_window=32``, ``kernel=7``, ``pooling="max"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NEG_INF, Policy, ScoreContext, reduce_group
from .expected_attention import rotate_half, unrotate
from .snapkv import pool_scores


def rerotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply HF-style RoPE to pre-RoPE ``x [B, H, T, D]`` with ``cos, sin [B, T, rot]``."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


@dataclass
class DapQ(Policy):
    """Pseudo queries at future decoding positions vote for prompt keys (SnapKV-style pooling)."""

    n_pseudo: int = 32
    offset: int = 0
    recent_window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa_reduce: str = "mean"
    name = "dapq"

    def __post_init__(self):
        self.window = self.recent_window  # the engine keeps (and protects) the last prompt tokens

    @property
    def queries_needed(self) -> int:
        return max(self.n_pseudo, self.recent_window)

    def pseudo_queries(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.rotary is None:
            raise ValueError("dapq needs the model's rotary embedding (RoPE models only)")
        m = min(self.n_pseudo, ctx.queries.shape[2])
        q = ctx.queries[:, :, -m:].float()
        pos = ctx.query_positions[:, -m:]
        cos, sin = ctx.rotary(pos)
        pre = unrotate(q, cos.float(), sin.float())
        future = pos[:, -1:] + 1 + self.offset + torch.arange(m, device=pos.device)[None, :]
        f_cos, f_sin = ctx.rotary(future)
        return rerotate(pre, f_cos.float(), f_sin.float())

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.phase != "prefill":
            raise ValueError("dapq compresses at prefill; use decode_budget only with decode-capable methods")
        pseudo = self.pseudo_queries(ctx)
        g = ctx.group_size
        k = ctx.keys.float().repeat_interleave(g, dim=1)
        logits = torch.matmul(pseudo, k.transpose(-1, -2)) * ctx.scaling  # [B, H, m, L]
        valid = ctx.valid.repeat_interleave(g, dim=1)[:, :, None, :]
        probs = torch.softmax(logits.masked_fill(~valid, NEG_INF), dim=-1).nan_to_num(0.0)
        votes = reduce_group(probs.sum(2), ctx.num_kv_heads, self.gqa_reduce)
        return pool_scores(votes, self.kernel, self.pooling)
