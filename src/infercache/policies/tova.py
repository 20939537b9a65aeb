"""``tova``: Token Omission Via Attention.

Oren et al. 2024, "Transformers are Multi-State RNNs", https://arxiv.org/abs/2401.06104. Score each entry by
the attention of the *last* query, averaged over all query heads of the layer, so one index set per layer
shared by every KV head; evict at prefill and at every decode step (authors' default cache size 512;
here the budget). Keys keep their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, ScoreContext, window_attention


@dataclass
class TOVA(Policy):
    """Last query's attention, mean over all heads (one index set per layer); evicts while decoding."""

    name = "tova"
    window = 1
    decode_mode = "evict"
    shared_across_heads = True

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        attn = window_attention(ctx, 1)[:, :, -1]  # [B, H, L]
        return attn.mean(1, keepdim=True).expand(-1, ctx.num_kv_heads, -1)
