"""Positions of stream entries: the layout of newly fed tokens and contiguous re-positioning after eviction.

Positions are 1-D (``[N]``) or, for M-RoPE models (Qwen2-VL), 3-D (``[3, N]``: temporal, height, width).

* :func:`layout`: text tokens get ``0, 1, 2, ...`` (the same on all three axes with M-RoPE); a vision chunk with a
  ``grid=(t, h, w)`` gets Qwen2-VL's layout (``t``, ``h``, ``w`` indices); the stream adds the next free position.
* :func:`reposition`: the authors' "positions within the cache" (StreamingLLM §3.2; StreamingVLM's contiguous
  "shrink" positions). Entries whose stream indices are consecutive form a *run* (nothing was evicted between
  them); each run keeps its internal layout and is shifted, on every axis alike, so that it starts right after
  the previous run ends. With 1-D text this is exactly ``positions = index within the cache``, and in general the
  largest position is below the number of held entries (a frame spans fewer positions than it has tokens).
"""

from __future__ import annotations

import torch


def layout(n: int, dims: int, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Relative positions (starting at 0) of ``n`` new tokens: ``[n]`` or ``[3, n]``."""
    if dims == 1:
        return torch.arange(n)
    if grid is None:
        return torch.arange(n)[None].expand(3, n).clone()
    t, h, w = (int(g) for g in grid)
    if t * h * w != n:
        raise ValueError(f"grid {grid} holds {t * h * w} tokens, but {n} were given")
    ti = torch.arange(t).view(t, 1, 1).expand(t, h, w).reshape(-1)
    hi = torch.arange(h).view(1, h, 1).expand(t, h, w).reshape(-1)
    wi = torch.arange(w).view(1, 1, w).expand(t, h, w).reshape(-1)
    return torch.stack([ti, hi, wi])


def _flat(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry min and max over the axes."""
    if pos.dim() == 1:
        return pos, pos
    return pos.amin(0), pos.amax(0)


def next_position(pos: torch.Tensor) -> int:
    """The first free position after ``pos`` (0 when empty)."""
    if pos.shape[-1] == 0:
        return 0
    return int(pos.max()) + 1


def run_ids(index: torch.Tensor) -> torch.Tensor:
    """Run number of each entry: a new run starts wherever stream indices are not consecutive."""
    if index.numel() == 0:
        return index.clone()
    breaks = torch.ones_like(index, dtype=torch.bool)
    breaks[1:] = index[1:] != index[:-1] + 1
    return torch.cumsum(breaks.long(), 0) - 1


def reposition(index: torch.Tensor, pos: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Contiguous positions for entries with stream ``index`` ``[N]`` and current positions ``pos``.

    Each run (consecutive indices) keeps its layout and starts one after the previous run's end; the first run
    starts at ``start``.
    """
    n = index.numel()
    if n == 0:
        return pos.clone()
    runs = run_ids(index)
    count = int(runs[-1]) + 1
    lo, hi = _flat(pos)
    run_min = torch.full((count,), torch.iinfo(torch.long).max, dtype=torch.long).scatter_reduce(0, runs, lo, "amin")
    run_max = torch.full((count,), torch.iinfo(torch.long).min, dtype=torch.long).scatter_reduce(0, runs, hi, "amax")
    extent = run_max - run_min + 1
    run_start = start + torch.cumsum(extent, 0) - extent
    shift = (run_start - run_min)[runs]
    return pos + shift
