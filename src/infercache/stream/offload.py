"""ReKV's block archive: evicted KV blocks in a tier of ``infercache.store``, their summaries in RAM.

ReKV, Di et al. 2025, https://arxiv.org/abs/2503.00540 (code: Becomebright/ReKV, ``ContextManager``): every block
that leaves the sliding window is offloaded (the authors: pinned CPU RAM, one ``MemoryUnit`` per layer) and
summarised by the mean of its pre-RoPE keys; a question's mean pre-RoPE query scores the blocks (an unnormalised dot
product, summed over heads) and each layer loads its own top-k.

Here a block is stored as one blob **per layer** (``infercache.store`` blob format, through
:class:`~infercache.store.KVStore` with a one-layer namespace), so a layer loads only its own blocks; the blob's
``extra`` holds the block's relative positions and, after merging, the token counts. Summaries (``[L, Hkv, D]``
float32 per block, ``1 / (2 x block_size)`` of the block's bytes) stay in RAM; ``max_blocks`` bounds them: the
oldest block is deleted from the store and forgotten beyond it. A blob the store lost (LRU eviction, a corrupt
entry) is a miss: the block is skipped.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import uuid
from dataclasses import dataclass

import torch

from ..store import BlobStore, KVStore, Namespace, open_store


@dataclass
class BlockInfo:
    """One archived block: stream index of its first token, entries stored, position extent, merged or not."""

    block_id: int
    start: int
    entries: int
    tokens: int
    extent: int


class BlockArchive:
    """Offloaded blocks (store) + their summaries (RAM) + top-k retrieval per layer."""

    def __init__(self, model, *, store: str | BlobStore | None = None, max_blocks: int | None = 1024):
        if max_blocks is not None and (not isinstance(max_blocks, int) or max_blocks < 1):
            raise ValueError(f"max_blocks must be a positive int or None, got {max_blocks!r}")
        self.max_blocks = max_blocks
        self._tmpdir = None
        self._own_tier = not isinstance(store, BlobStore)
        if store is None:
            self._tmpdir = tempfile.mkdtemp(prefix="infercache-rekv-")
            store = f"memory://?max_bytes=256MiB,disk:{self._tmpdir}?fsync=false"
            self.tier = open_store(store, write="back")
        elif isinstance(store, str):
            self.tier = open_store(store)
        else:
            self.tier = store
        config = model.config.get_text_config(decoder=True)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.session = uuid.uuid4().hex[:12]
        base = Namespace.from_config(config, model_id=str(getattr(config, "_name_or_path", "") or type(model).__name__),
                                     weights_hash=f"stream-session-{self.session}", dtype=dtype)
        self.num_layers = base.num_layers
        self.kv = KVStore(self.tier, dataclasses.replace(base, num_layers=1))
        self.blocks: list[BlockInfo] = []
        self._summaries: list[torch.Tensor] = []  # [L, Hkv, D] float32 per block
        self._stacked: torch.Tensor | None = None
        self._next_id = 0
        self.max_extent = 0
        self.dropped = 0

    def key(self, block_id: int, layer: int) -> str:
        return f"rekv-{self.session}-{block_id:09d}-{layer:03d}"

    # ------------------------------------------------------------------ writing
    def put(self, kv: list[tuple[torch.Tensor, torch.Tensor]], *, start: int, rel_pos: torch.Tensor,
            summary: torch.Tensor, counts: torch.Tensor | None = None, tokens: int | None = None) -> BlockInfo:
        """Archive one block: per-layer pre-RoPE ``(keys, values)`` ``[H, n, D]`` (``None``: not stored for that
        layer), positions relative to the block ``[n]`` / ``[3, n]``, summary ``[L, H, D]``, optional merge counts
        ``[n]``."""
        block_id = self._next_id
        self._next_id += 1
        extra = {"pos": rel_pos.tolist()}
        if counts is not None:
            extra["counts"] = counts.tolist()
        for layer, pair in enumerate(kv):
            if pair is not None:  # None: a layer that never retrieves (local sliding window)
                self.kv.put_chunk(self.key(block_id, layer), [pair], start=start, extra=extra)
        n = next(pair for pair in kv if pair is not None)[0].shape[1]
        extent = int(rel_pos.max()) + 1 if rel_pos.numel() else 0
        info = BlockInfo(block_id, start, n, tokens if tokens is not None else n, extent)
        self.blocks.append(info)
        self._summaries.append(summary.detach().float().cpu())
        self._stacked = None
        self.max_extent = max(self.max_extent, extent)
        while self.max_blocks is not None and len(self.blocks) > self.max_blocks:
            self._drop_oldest()
        return info

    def _drop_oldest(self) -> None:
        info = self.blocks.pop(0)
        self._summaries.pop(0)
        self._stacked = None
        for layer in range(self.num_layers):
            self.tier.delete(self.key(info.block_id, layer))
        self.dropped += 1

    # ------------------------------------------------------------------ reading
    def summaries(self) -> torch.Tensor:
        """``[blocks, L, Hkv, D]`` float32."""
        if self._stacked is None:
            self._stacked = torch.stack(self._summaries) if self._summaries else torch.zeros(0)
        return self._stacked

    def top_k(self, layer: int, query: torch.Tensor, k: int) -> list[int]:
        """Positions (in :attr:`blocks`) of the ``k`` blocks whose mean key best matches ``query`` ``[Hq, D]``
        (pre-RoPE, averaged over the question), in stream order."""
        if not self.blocks or k <= 0:
            return []
        keys = self.summaries()[:, layer]  # [nb, Hkv, D]
        hkv = keys.shape[1]
        q = query.float().cpu().reshape(hkv, -1, query.shape[-1]).sum(1)  # GQA: a KV head serves its query group
        scores = torch.einsum("bhd,hd->b", keys, q)
        top = torch.topk(scores, min(k, len(self.blocks))).indices
        return sorted(top.tolist())

    def load(self, slot: int, layer: int):
        """``(keys [H, n, D], values, rel_pos, counts | None)`` of block ``blocks[slot]`` for one layer, or
        ``None`` when the store no longer has it."""
        info = self.blocks[slot]
        found = self.kv.get_chunk(self.key(info.block_id, layer), start=info.start, num_tokens=info.entries)
        if found is None:
            return None
        (k, v), meta = found[0][0], found[1]
        pos = torch.tensor(meta.extra["pos"], dtype=torch.long)
        counts = meta.extra.get("counts")
        return k, v, pos, None if counts is None else torch.tensor(counts, dtype=torch.long)

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """RAM held by the summaries (the store reports its own bytes: :meth:`store_bytes`)."""
        return sum(s.numel() * s.element_size() for s in self._summaries)

    def store_bytes(self) -> int:
        return self.tier.nbytes()

    def close(self) -> None:
        if self._tmpdir is not None:  # our own RAM + temp-disk stack: no write-back flush, the folder goes away
            for tier in self.tier.tiers:
                tier.close()
        elif self._own_tier:
            self.tier.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
