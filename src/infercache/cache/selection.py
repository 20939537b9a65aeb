"""Turning scores and capacities into kept indices (per row and KV head, chronological order)."""

from __future__ import annotations

import torch

POS_INF = float("inf")


def protect(scores: torch.Tensor, valid: torch.Tensor, *, first: int = 0, last: torch.Tensor | int = 0) -> torch.Tensor:
    """Give the first ``first`` and the last ``last`` real entries of each head an infinite score.

    ``last`` may be a ``[B, Hkv]`` tensor. Protected entries still count inside the budget; among them the
    newest win when the budget is smaller (their scores are ``inf`` offset by recency).
    """
    rank = torch.cumsum(valid.long(), dim=-1) - 1  # 0-based rank among real entries
    n_valid = valid.sum(-1, keepdim=True)
    last_t = torch.as_tensor(last, device=scores.device)
    if last_t.dim() == 2:
        last_t = last_t[..., None]
    protected = valid & ((rank < first) | (rank >= n_valid - last_t))
    if not bool(protected.any()):
        return scores
    # Protected entries outrank everything, newest first among themselves.
    boost = torch.finfo(torch.float32).max / 4 + rank.float()
    return torch.where(protected, boost, scores.float().clamp(max=torch.finfo(torch.float32).max / 8))


def select(scores: torch.Tensor, valid: torch.Tensor, capacity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``capacity[b, h]`` real entries per head, returned in chronological order.

    Returns ``keep [B, Hkv, Kmax]`` (indices, padded with 0) and ``counts [B, Hkv]``.
    """
    length = scores.shape[-1]
    counts = torch.minimum(capacity.to(torch.long).cpu(), valid.sum(-1).cpu()).clamp_min(0)
    kmax = int(counts.max()) if counts.numel() else 0
    masked = scores.float().masked_fill(~valid, float("-inf"))
    # A stable sort breaks exact ties (common after max pooling) by chronological order, so a left-padded
    # row selects exactly what the same prompt selects alone.
    top = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :kmax]  # [B, Hkv, kmax]
    slot = torch.arange(kmax, device=scores.device)
    live = slot[None, None, :] < counts.to(scores.device)[..., None]
    ordered = torch.sort(torch.where(live, top, torch.full_like(top, length)), dim=-1).values
    return torch.where(ordered < length, ordered, torch.zeros_like(ordered)), counts
