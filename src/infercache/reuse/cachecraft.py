"""``mode="cachecraft"``: chunk reuse where a per-chunk rule decides how many tokens to recompute (Cache-Craft).

Paper: Agarwal et al., *Cache-Craft: Managing Chunk-Caches for Efficient Retrieval-Augmented Generation*, SIGMOD 2025,
https://arxiv.org/abs/2502.15734 (no official code; formulas as cited by two public re-implementations, see
``shared/research/kv-reuse-and-stores.md`` §4).

For a reused segment ``C_i`` stored with its old prefix ``S_old`` and attention statistics (:mod:`.attnstats`), now
served after ``S_new``:

* ``β = Σ_{j∈S_old∩S_new} inter(C_i, C_j) / Σ_{j∈S_old} inter(C_i, C_j)`` (Eq. 6, summed over layers);
* ``γ = D / C(m, 2)``, ``D`` = discordant pairs among the ``m`` chunks common to both prefixes (Eq. 7);
  ``β' = β(1-γ)``;
* ``a^l = Σ_j inter^l(C_i,C_j) / (|C_i||C_j|)``, ``b^l = intra^l(C_i) / |C_i|²``, ``CCI = σ(ā / b̄)`` (Eq. 9-11);
* ``CFO = α · CCI · (1 - β')`` clamped to ``[0, 1]`` (Eq. 12), and the ``⌈CFO·|C_i|⌉`` tokens with the largest
  stored inter-attention are recomputed at every layer (Eq. 14), with every fresh token.

Our choices where the paper leaves a gap: ``α`` is tuned offline in the paper and not reported; our default
``alpha=0.3`` caps the recompute at 30 % of a chunk (the paper reports ~90 % of full quality at 30 % recompute).
A chunk stored with no prefix (``S_old`` empty) has ``β = 1`` if it is again first, else ``β = 0``. One variant per
chunk (the first one stored); no adaptive early termination of recompute; no layer-wise preloading.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: Our default α (not reported by the paper).
DEFAULT_ALPHA = 0.3


@dataclass
class FixPlan:
    """The rule's numbers for one reused segment and how many of its tokens it recomputes."""

    beta: float
    gamma: float
    beta_adjusted: float
    cci: float
    cfo: float
    recompute: int

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def order_penalty(old_prefix: Sequence[str], new_prefix: Sequence[str]) -> float:
    """γ: fraction of discordant pairs (Kendall-τ distance) among chunks present in both prefixes (Eq. 7)."""
    new_rank = {key: rank for rank, key in reversed(list(enumerate(new_prefix)))}
    seen: set[str] = set()
    common = []
    for key in old_prefix:
        if key in new_rank and key not in seen:
            seen.add(key)
            common.append(new_rank[key])
    m = len(common)
    if m < 2:
        return 0.0
    discordant = sum(1 for a in range(m) for b in range(a + 1, m) if common[a] > common[b])
    return discordant / (m * (m - 1) / 2)


def fix_plan(stats: dict[str, Any] | None, old_prefix: Sequence[str], old_lengths: Sequence[int],
             new_prefix: Sequence[str], num_tokens: int, alpha: float = DEFAULT_ALPHA) -> FixPlan:
    """Cache-Craft's rule (Eq. 6-12) for one segment (without ``stats``: equal weights per old chunk, ``CCI = 1``)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    gamma = order_penalty(old_prefix, new_prefix)
    if not stats or not stats.get("inter"):
        # no statistics: every old prefix chunk counts the same, and the chunk is assumed context-heavy (CCI = 1)
        new_set = set(new_prefix)
        if not old_prefix:
            beta = 1.0 if not new_prefix else 0.0
        else:
            beta = sum(1 for key in old_prefix if key in new_set) / len(old_prefix)
        cci = 1.0
    else:
        inter = torch.tensor(stats["inter"], dtype=torch.float64).reshape(len(stats["inter"]), -1)  # [L, |S_old|]
        intra = torch.tensor(stats["intra"], dtype=torch.float64)  # [L]
        per_chunk = inter.sum(0)
        total = float(per_chunk.sum())
        new_set = set(new_prefix)
        if total <= 0.0:
            beta = 1.0 if not new_prefix else 0.0
        else:
            beta = float(sum(per_chunk[j] for j, key in enumerate(old_prefix) if key in new_set)) / total
        lengths = torch.tensor([max(n, 1) for n in old_lengths], dtype=torch.float64)
        a = (inter / (num_tokens * lengths)).sum(1).mean()
        b = (intra / num_tokens**2).mean()
        cci = 1.0 if float(b) <= 0.0 else 1.0 / (1.0 + math.exp(-float(a / b)))
    beta_adjusted = beta * (1.0 - gamma)
    cfo = min(max(alpha * cci * (1.0 - beta_adjusted), 0.0), 1.0)
    return FixPlan(beta=beta, gamma=gamma, beta_adjusted=beta_adjusted, cci=cci, cfo=cfo,
                   recompute=min(num_tokens, math.ceil(cfo * num_tokens - 1e-9)))


def pick_tokens(stats: dict[str, Any] | None, count: int, num_tokens: int) -> torch.Tensor:
    """The ``count`` local token indices with the highest stored inter-attention (evenly spaced without stats)."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    scores = (stats or {}).get("token_inter")
    if scores is None or len(scores) != num_tokens:
        return torch.linspace(0, num_tokens - 1, count).round().long().unique()
    return torch.tensor(scores, dtype=torch.float64).topk(count).indices.sort().values
