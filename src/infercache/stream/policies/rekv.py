"""``rekv``: a sliding window whose evicted blocks are offloaded and retrieved per layer when a question comes.

ReKV, Di et al. 2025, https://arxiv.org/abs/2503.00540 (code: Becomebright/ReKV). The stream is encoded with
sliding-window attention over ``sinks`` initial tokens + the recent window (``budget - sinks``); whole blocks of
``block_size`` (32) tokens leave the window and go to a tier of ``infercache.store`` (by default 256 MiB of RAM,
then a temporary disk folder), each summarised by its mean pre-RoPE key per layer and KV head. A question's mean
pre-RoPE query picks the ``topk`` (8) best blocks **per layer**; the question attends over sinks + retrieved blocks
(in stream order) + recent window with contiguous positions, and the blocks are released after the answer.
Authors' defaults: one frame per block (196 tokens for LLaVA-OneVision), top 64 blocks, a window of 15K tokens;
ours suit 1K-4K budgets on small models. ``merge_frames=True`` merges near-duplicate frame tokens of a block
before it is offloaded (:mod:`infercache.stream.merge`, after V-Rex https://arxiv.org/abs/2512.12284).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..entries import VISION, Entries
from ..errors import StreamBudgetError
from ..merge import merge_block, merge_groups
from ..offload import BlockArchive
from ..positions import next_position, reposition
from ..rotary import apply_rope
from .base import StreamPolicy

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import StreamLayer
    from ..stream import Stream


@dataclass
class ReKV(StreamPolicy):
    """Sinks + sliding window; evicted blocks offloaded with mean-key summaries; top-k blocks per layer per question."""

    sinks: int = 4
    block_size: int = 32
    topk: int = 8
    store: object = None  # a store URL, a BlobStore, or None for RAM (256 MiB) then a temporary disk folder
    max_blocks: int | None = 1024
    merge_frames: bool = False
    merge_threshold: float = 0.95
    name: ClassVar[str] = "rekv"
    evicts_oldest: ClassVar[bool] = True
    archive: BlockArchive | None = field(default=None, init=False, repr=False)

    def setup(self, budget: int, stream: "Stream") -> None:
        super().setup(budget, stream)
        for name in ("block_size", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StreamBudgetError(f"rekv: {name} must be a positive int, got {value!r}")
        if budget - self.sinks < self.block_size:
            raise StreamBudgetError(
                f"rekv: the window (budget {budget} - {self.sinks} sinks) must hold at least one block of "
                f"{self.block_size} tokens"
            )
        if not 0.0 < float(self.merge_threshold) <= 1.0:
            raise StreamBudgetError(f"rekv: merge_threshold must be a cosine in (0, 1], got {self.merge_threshold}")
        self.archive = BlockArchive(stream.model, store=self.store, max_blocks=self.max_blocks)
        self.merged_tokens = 0
        self.last_fetched: dict[int, list[int]] = {}  # layer -> stream index of each block the last question used

    def local_window_ok(self, window: int) -> bool:
        # a question puts the retrieved blocks right after the sinks: a sliding layer must not reach them (it does
        # not hold the offloaded blocks); after any eviction at least budget - block_size + 1 entries are held
        return super().local_window_ok(window) and window - 1 <= self.budget - self.sinks - self.block_size

    # ------------------------------------------------------------------ feeding
    def select(self, entries: Entries, incoming: int, modality: int) -> torch.Tensor | None:
        n = len(entries)
        if n + incoming <= self.budget:
            return None
        s = min(self.sinks, n)
        excess = n + incoming - self.budget
        n_evict = min(n - s, math.ceil(excess / self.block_size) * self.block_size)
        return torch.cat([torch.arange(s), torch.arange(s + n_evict, n)])

    @torch.no_grad()
    def evict(self, stream: "Stream", drop: torch.Tensor) -> None:
        entries = stream.cache.entries
        for start in range(0, drop.numel(), self.block_size):
            idx = drop[start : start + self.block_size]
            kv = stream.cache.kv(idx)  # None for local (sliding-window) layers: nothing to offload there
            stored = [pair for pair in kv if pair is not None]
            if not stored:
                return
            block = entries.take(idx)
            rel = reposition(block.index, block.pos)
            means = [None if pair is None else pair[0].float().mean(1) for pair in kv]
            zero = torch.zeros_like(stored[0][0][:, 0], dtype=torch.float32)
            summary = torch.stack([zero if m is None else m for m in means])  # [L, H, D], over the original tokens
            counts = None
            vision = block.modality == VISION
            if self.merge_frames and bool(vision.any()):
                groups = merge_groups(stored[0][0], vision, self.merge_threshold)
                if int(groups.max()) + 1 < idx.numel():
                    kv, counts, first = merge_block(kv, groups)
                    rel = rel[..., first]
                    self.merged_tokens += idx.numel() - counts.numel()
            self.archive.put(kv, start=int(block.index[0]), rel_pos=rel, summary=summary, counts=counts,
                             tokens=idx.numel())

    # ------------------------------------------------------------------ questions
    def begin_ask(self, stream: "Stream") -> tuple[int, int]:
        archive = self.archive
        if not archive.blocks:
            return 0, 0
        k = min(self.topk, len(archive.blocks))
        cache = stream.cache
        s = min(self.sinks, cache.held)
        base = next_position(cache.entries.pos[..., :s])
        span = archive.max_extent
        cache.retrieval = _Retrieval(archive, stream.rotary, insert_at=s, base=base, span=span, k=k)
        return s, k * span

    def end_ask(self, stream: "Stream") -> None:
        retrieval = stream.cache.retrieval
        self.last_fetched = dict(retrieval.fetched) if retrieval is not None else {}
        stream.cache.retrieval = None
        for layer in stream.cache.layers:
            layer.retrieved = None

    # ------------------------------------------------------------------ reports
    def nbytes(self) -> int:
        return self.archive.nbytes() if self.archive else 0

    def stats(self) -> dict:
        if self.archive is None:
            return {}
        return {"offloaded_blocks": len(self.archive.blocks), "dropped_blocks": self.archive.dropped,
                "store_bytes": self.archive.store_bytes(), "summary_bytes": self.archive.nbytes(),
                "merged_tokens": self.merged_tokens}

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()


class _Retrieval:
    """Plugged into the cache for one question: each layer fetches its top-k blocks on its first forward."""

    def __init__(self, archive: BlockArchive, rotary, *, insert_at: int, base: int, span: int, k: int):
        self.archive, self.rotary = archive, rotary
        self.insert_at, self.base, self.span, self.k = insert_at, base, span, k
        self.fetched: dict[int, list[int]] = {}  # layer -> block stream starts (for tests and reports)

    @torch.no_grad()
    def fetch(self, layer: "StreamLayer", query_pre_rope: torch.Tensor):
        slots = self.archive.top_k(layer.layer_idx, query_pre_rope[0].float().mean(1), self.k)
        keys, values, pos, bias = [], [], [], []
        for j, slot in enumerate(slots):
            found = self.archive.load(slot, layer.layer_idx)
            if found is None:
                continue
            k, v, rel, counts = found
            keys.append(k)
            values.append(v)
            pos.append(rel + self.base + j * self.span)
            bias.append(torch.zeros(k.shape[1]) if counts is None else counts.float().log())
        self.fetched[layer.layer_idx] = [self.archive.blocks[s].start for s in slots]
        if not keys:
            return None
        k = torch.cat(keys, dim=1)[None].to(layer.device)
        cos, sin = self.rotary.cos_sin(torch.cat(pos, dim=-1), layer.layer_type)
        return apply_rope(k, cos, sin), torch.cat(values, dim=1)[None].to(layer.device), torch.cat(bias)
