"""``knorm``: keep the keys with the lowest L2 norm.

Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
https://arxiv.org/abs/2406.11430. Score ``-||k||``: no attention needed, GQA-native. The authors' code
skips layers 0 and 1 (they keep their full cache), which we follow by default (``skip_layers=(0, 1)``);
kvpress compresses every layer. The original returns kept keys in norm order; we keep chronological
order, which changes nothing in attention (keys carry their positions) but keeps the cache appendable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, ScoreContext


@dataclass
class KNorm(Policy):
    """Low key norm = important. Layers in ``skip_layers`` (default 0 and 1) are not compressed."""

    skip_layers: tuple[int, ...] = (0, 1)
    name = "knorm"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)
