"""A KV cache for autoregressive (chunk-by-chunk, causal) video diffusion: sink / compressed mid / recent.

Designs it follows (research notes §3): Ca2-VDM (arXiv 2411.16375; causal temporal attention, so the K/V of
finished frames are written **once per chunk** from the clean latent and **shared by every denoising step** of the
following chunks), Anchor Forcing (arXiv 2603.13405; a sink region, keys stored **without RoPE** and positioned
per region at attention time) and PackForcing (arXiv 2603.25730; three partitions: sink, a **compressed mid**
bank with top-k selection, and a full-resolution **recent** window, with gap-closing temporal RoPE).

Layout, per layer, in *segments* (one committed chunk each; the chunk is the unit of eviction and selection):

* **sink**: the first ``sink_frames`` frames ever committed, full resolution, never evicted;
* **recent**: a FIFO of the newest frames at full resolution, at most ``recent_frames`` frames; when it
  overflows, its oldest segment moves to mid;
* **mid**: evicted recent segments, compressed by average-pooling the keys and values over
  ``mid_pool x mid_pool`` spatial tokens (a stand-in for PackForcing's learned compressor), at most
  ``mid_capacity`` segments (the oldest is dropped; ``None``: unbounded; 0: evicted frames are dropped). At read
  time ``mid_topk`` segments may be selected by query-key affinity (``None``: all).

Temporal positions for RoPE, assigned at attention time (keys are stored pre-RoPE):

* ``"absolute"``: every token keeps its true frame index (positions grow without bound);
* ``"rebased"``: the kept frames are numbered contiguously in the order sink, mid, recent, and the query chunk
  follows them, so gaps left by evicted frames close and positions stay below
  ``sink_frames + mid frames + recent_frames + chunk_frames`` however long the stream is.

Writes happen only in :meth:`ARVideoKVCache.commit` (a separate cache-write forward of the finished, clean chunk);
denoising forwards only read (:meth:`ARVideoKVCache.context`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class ARCacheConfig:
    """Partition budgets (in frames / segments) and the position policy; see the module docstring."""

    sink_frames: int = 1
    recent_frames: int = 4
    mid_capacity: int | None = 4
    mid_pool: int = 2
    mid_topk: int | None = None
    positions: Literal["absolute", "rebased"] = "rebased"

    def __post_init__(self) -> None:
        if self.sink_frames < 0 or self.recent_frames < 0:
            raise ValueError("sink_frames and recent_frames must be >= 0")
        if self.mid_capacity is not None and self.mid_capacity < 0:
            raise ValueError("mid_capacity must be >= 0 or None")
        if self.mid_pool < 1:
            raise ValueError("mid_pool must be >= 1")
        if self.mid_topk is not None and self.mid_topk < 0:
            raise ValueError("mid_topk must be >= 0 or None")
        if self.positions not in ("absolute", "rebased"):
            raise ValueError(f"positions must be 'absolute' or 'rebased', got {self.positions!r}")

    @classmethod
    def unbounded(cls, positions: Literal["absolute", "rebased"] = "absolute") -> ARCacheConfig:
        """Keep every frame at full resolution (the exact cache of Ca2-VDM without a queue limit)."""
        return cls(sink_frames=0, recent_frames=10**9, mid_capacity=None, mid_pool=1, positions=positions)


@dataclass
class Segment:
    """K/V of consecutive frames of one layer: ``k``/``v`` are ``(B, heads, n_tokens, head_dim)``, pre-RoPE;
    ``frames`` the absolute frame index of each token; ``grid`` the ``(h, w)`` token grid of one frame."""

    k: torch.Tensor
    v: torch.Tensor
    frames: torch.Tensor
    grid: tuple[int, int]
    compressed: bool = False

    @property
    def num_frames(self) -> int:
        return int(self.frames.unique().numel())

    def split(self, n_frames: int) -> tuple[Segment, Segment]:
        """The first ``n_frames`` frames and the rest."""
        per = self.grid[0] * self.grid[1]
        i = n_frames * per
        a = Segment(self.k[:, :, :i], self.v[:, :, :i], self.frames[:i], self.grid, self.compressed)
        b = Segment(self.k[:, :, i:], self.v[:, :, i:], self.frames[i:], self.grid, self.compressed)
        return a, b

    def pooled(self, p: int) -> Segment:
        """Average-pool every frame's ``(h, w)`` token grid by ``p`` (keys and values)."""
        if p == 1:
            return Segment(self.k, self.v, self.frames, self.grid, True)
        h, w = self.grid
        if h % p or w % p:
            raise ValueError(f"mid_pool {p} does not divide the token grid {self.grid}")
        b, heads, n, d = self.k.shape
        f = n // (h * w)

        def pool(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(b, heads, f, h // p, p, w // p, p, d).mean(dim=(4, 6))
            return x.reshape(b, heads, f * (h // p) * (w // p), d)

        frames = self.frames.reshape(f, h * w)[:, 0].repeat_interleave((h // p) * (w // p))
        return Segment(pool(self.k), pool(self.v), frames, (h // p, w // p), True)


@dataclass
class LayerCache:
    sink: list[Segment] = field(default_factory=list)
    mid: list[Segment] = field(default_factory=list)
    recent: list[Segment] = field(default_factory=list)

    def frames(self, part: str) -> int:
        return sum(s.num_frames for s in getattr(self, part))

    def tokens(self, part: str) -> int:
        return sum(s.k.shape[2] for s in getattr(self, part))


class ARVideoKVCache:
    """The cache of one video stream (all layers). ``commit`` writes a finished chunk; ``context`` reads."""

    def __init__(self, num_layers: int, config: ARCacheConfig | None = None) -> None:
        self.config = config or ARCacheConfig()
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.num_frames = 0  # frames committed so far (the next chunk starts here)
        self.commits = 0
        self._pending: int | None = None  # frames of the chunk being committed (set by begin_commit)

    # -- writing ------------------------------------------------------------------------------------------------
    def begin_commit(self, num_frames: int) -> None:
        if self._pending is not None:
            raise RuntimeError("a commit is already in progress")
        self._pending = num_frames

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> None:
        """Store layer ``layer``'s pre-RoPE ``k``/``v`` ``(B, heads, F*h*w, d)`` of the chunk being committed."""
        if self._pending is None:
            raise RuntimeError("write() outside a commit: denoising forwards must not write the cache")
        cfg, lc = self.config, self.layers[layer]
        per = grid[0] * grid[1]
        f = k.shape[2] // per
        frames = torch.arange(self.num_frames, self.num_frames + f, device=k.device).repeat_interleave(per)
        seg = Segment(k.detach(), v.detach(), frames, grid)
        room = cfg.sink_frames - lc.frames("sink")
        if room > 0:
            head, seg = seg.split(min(room, f))
            lc.sink.append(head)
        if seg.k.shape[2]:
            lc.recent.append(seg)
        while lc.recent and lc.frames("recent") > cfg.recent_frames:
            old = lc.recent.pop(0)
            if cfg.mid_capacity is None or cfg.mid_capacity > 0:
                lc.mid.append(old.pooled(cfg.mid_pool))
            while cfg.mid_capacity is not None and len(lc.mid) > cfg.mid_capacity:
                lc.mid.pop(0)

    def end_commit(self) -> None:
        if self._pending is None:
            raise RuntimeError("end_commit() without begin_commit()")
        self.num_frames += self._pending
        self.commits += 1
        self._pending = None

    # -- reading ------------------------------------------------------------------------------------------------
    def select_mid(self, layer: int, q: torch.Tensor) -> list[Segment]:
        """The mid segments used for queries ``q`` ``(B, heads, n, d)``: all, or the ``mid_topk`` with the highest
        affinity ``mean(q) . mean(k)`` (pre-RoPE), kept in time order."""
        mid = self.layers[layer].mid
        k = self.config.mid_topk
        if k is None or len(mid) <= k:
            return list(mid)
        qm = q.float().mean(dim=2)  # (B, heads, d)
        scores = torch.stack([(qm * s.k.float().mean(dim=2)).sum(-1).mean() for s in mid])
        keep = sorted(torch.topk(scores, k).indices.tolist())
        return [mid[i] for i in keep]

    def context(
        self, layer: int, q: torch.Tensor, num_query_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, key_positions, query_frame_positions)`` for a chunk of ``num_query_frames`` frames that starts
        at frame ``self.num_frames`` (during a commit: the chunk being committed). Positions are temporal (frames)."""
        lc = self.layers[layer]
        segs = lc.sink + self.select_mid(layer, q) + lc.recent
        start = self.num_frames
        if not segs:
            empty = q.new_zeros(q.shape[0], q.shape[1], 0, q.shape[3])
            pos = torch.zeros(0, device=q.device)
            qpos = torch.arange(num_query_frames, device=q.device, dtype=torch.float32)
            return empty, empty, pos, qpos + (start if self.config.positions == "absolute" else 0)
        k = torch.cat([s.k for s in segs], dim=2)
        v = torch.cat([s.v for s in segs], dim=2)
        frames = torch.cat([s.frames for s in segs])
        if self.config.positions == "absolute":
            kpos = frames.float()
            qpos = torch.arange(start, start + num_query_frames, device=q.device, dtype=torch.float32)
        else:  # rebased: kept frames numbered 0.. in cache order (sink, mid, recent), the query right after
            order: list[int] = []
            for f in frames.tolist():
                if not order or order[-1] != f:
                    order.append(f)
            rank = {f: i for i, f in enumerate(order)}
            kpos = torch.tensor([rank[f] for f in frames.tolist()], device=q.device, dtype=torch.float32)
            qpos = torch.arange(len(order), len(order) + num_query_frames, device=q.device, dtype=torch.float32)
        return k, v, kpos, qpos

    # -- accounting ---------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        total = 0
        for lc in self.layers:
            for s in lc.sink + lc.mid + lc.recent:
                total += s.k.numel() * s.k.element_size() + s.v.numel() * s.v.element_size()
        return total

    def summary(self) -> dict[str, int]:
        lc = self.layers[0]
        return dict(
            frames_committed=self.num_frames,
            commits=self.commits,
            sink_frames=lc.frames("sink"),
            mid_segments=len(lc.mid),
            mid_tokens=lc.tokens("mid"),
            recent_frames=lc.frames("recent"),
            recent_tokens=lc.tokens("recent"),
            bytes=self.memory_bytes(),
        )


def max_cache_tokens(config: ARCacheConfig, tokens_per_frame: int, chunk_frames: int) -> int | None:
    """Upper bound on the cached tokens per layer (``None`` when a partition is unbounded)."""
    if config.mid_capacity is None or config.recent_frames >= 10**9:
        return None
    mid = config.mid_capacity * chunk_frames * tokens_per_frame // config.mid_pool**2
    return (config.sink_frames + config.recent_frames) * tokens_per_frame + mid
