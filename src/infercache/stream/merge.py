"""V-Rex-style merging of near-duplicate frame tokens before a ReKV block is offloaded.

V-Rex / ReSV, https://arxiv.org/abs/2512.12284, clusters similar tokens across and within frames (by hashed keys)
and scores clusters instead of tokens. No code was released; this is our simple, documented reading of the idea:

* similarity is the cosine of the **first layer's pre-RoPE keys** (all heads concatenated): a projection of the
  token's embedding alone, so the decision is the same for every layer and a merged block has one token count;
* greedy, in stream order: a vision token joins the most similar cluster of its block if the cosine with the
  cluster's mean is at least ``threshold`` (default 0.95), else it starts a cluster; text tokens never merge;
* a cluster becomes one entry: mean pre-RoPE key and mean value (per layer and head), the position of its first
  member, and a logit bias of ``+ln(count)`` so that ``count`` identical tokens merged into one receive exactly
  the attention they received apart (tested).
"""

from __future__ import annotations

import torch


def merge_groups(keys: torch.Tensor, mergeable: torch.Tensor, threshold: float = 0.95) -> torch.Tensor:
    """Cluster id of each of ``n`` tokens from keys ``[H, n, D]``; clusters are numbered by first member."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"merge threshold must be a cosine in (0, 1], got {threshold}")
    n = keys.shape[1]
    feats = keys.permute(1, 0, 2).reshape(n, -1).float()
    groups = torch.empty(n, dtype=torch.long)
    sums: list[torch.Tensor] = []
    open_groups: list[int] = []  # clusters that may take more vision tokens
    for j in range(n):
        if bool(mergeable[j]) and open_groups:
            cents = torch.stack([sums[g] for g in open_groups])
            sims = torch.nn.functional.cosine_similarity(cents, feats[j][None], dim=-1)
            best = int(sims.argmax())
            if float(sims[best]) >= threshold - 1e-6:
                g = open_groups[best]
                groups[j] = g
                sums[g] = sums[g] + feats[j]
                continue
        groups[j] = len(sums)
        sums.append(feats[j].clone())
        if bool(mergeable[j]):
            open_groups.append(groups[j].item())
    return groups


def merge_block(kv: list[tuple[torch.Tensor, torch.Tensor]], groups: torch.Tensor):
    """Average the tokens of each cluster in every layer: ``(merged kv, counts [G], first member [G])``."""
    count = int(groups.max()) + 1
    counts = torch.bincount(groups, minlength=count)
    first = torch.full((count,), groups.numel(), dtype=torch.long).scatter_reduce(
        0, groups, torch.arange(groups.numel()), "amin")
    merged = []
    for pair in kv:
        if pair is None:  # a layer that stores nothing (a local sliding-window layer)
            merged.append(None)
            continue
        keys, values = pair
        g = groups.to(keys.device)
        scale = counts.to(keys.device, torch.float32)[None, :, None]
        k = torch.zeros(keys.shape[0], count, keys.shape[2], dtype=torch.float32, device=keys.device)
        v = torch.zeros(values.shape[0], count, values.shape[2], dtype=torch.float32, device=values.device)
        k.index_add_(1, g, keys.float())
        v.index_add_(1, g, values.float())
        merged.append(((k / scale).to(keys.dtype), (v / scale).to(values.dtype)))
    return merged, counts, first
