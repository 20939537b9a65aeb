"""Ragged paged storage: one variable-length sequence of entries per (batch row, KV head).

Entries live in flat pools of fixed-size pages (``page_size`` slots each), one pool per channel (keys,
values, optional per-entry statistics). Each (row, head) owns a list of pages (its page table) and a length.
Invariants, checked by the tests:

* a head holds ``ceil(length / page_size)`` pages, so the slack is below one page per head;
* the pools hold exactly the pages that are in some page table (compaction after every eviction);
* entries of a head stay in the order they were written (chronological for a KV cache).

Gathering builds a transient padded ``[B, H, Lmax, ...]`` copy for one layer at a time, with the lengths
that say which slots are real; the storage itself is never padded to the longest head.
"""

from __future__ import annotations

import math

import torch


class RaggedStore:
    """Paged variable-length storage for ``B x H`` sequences with several channels of per-entry data."""

    def __init__(self, batch: int, heads: int, page_size: int = 16):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.batch, self.heads, self.page_size = batch, heads, page_size
        self.pools: dict[str, torch.Tensor] = {}
        self.lengths = torch.zeros(batch, heads, dtype=torch.long)
        self.page_table = torch.zeros(batch * heads, 0, dtype=torch.long)  # padded with -1

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dense(
        cls,
        channels: dict[str, torch.Tensor],
        keep: torch.Tensor,
        counts: torch.Tensor,
        page_size: int = 16,
    ) -> "RaggedStore":
        """Build from dense ``[B, H, L, ...]`` channels, keeping ``keep[b, h, :counts[b, h]]`` (token indices)."""
        first = next(iter(channels.values()))
        batch, heads = first.shape[:2]
        store = cls(batch, heads, page_size)
        store.lengths = torch.zeros(batch, heads, dtype=torch.long)
        store._write_compact(channels, keep, counts.to(torch.long).cpu(), source_flat=False)
        return store

    def _write_compact(self, channels, keep, counts, *, source_flat: bool):
        """Lay out ``counts[b, h]`` entries per head in fresh, compact pools."""
        b, h, p = self.batch, self.heads, self.page_size
        counts_flat = counts.reshape(-1)
        pages_per_head = (counts_flat + p - 1) // p
        total_pages = int(pages_per_head.sum())
        max_pages = int(pages_per_head.max()) if counts_flat.numel() else 0
        first_page = torch.cumsum(pages_per_head, 0) - pages_per_head
        table = first_page[:, None] + torch.arange(max_pages)[None, :]
        table = torch.where(torch.arange(max_pages)[None, :] < pages_per_head[:, None], table, torch.full_like(table, -1))
        kmax = keep.shape[-1]
        device = keep.device
        j = torch.arange(kmax, device=device)
        valid = j[None, :] < counts_flat.to(device)[:, None]  # [BH, kmax]
        dst = (first_page.to(device)[:, None] * p + j[None, :])[valid]
        new_pools = {}
        for name, data in channels.items():
            if source_flat:
                src_rows = data[keep.reshape(b * h, kmax)[valid]]
            else:
                dense = data.reshape(b * h, data.shape[2], *data.shape[3:])
                idx = keep.reshape(b * h, kmax).clamp_min(0)
                gathered = torch.gather(
                    dense, 1, idx.view(b * h, kmax, *([1] * (dense.dim() - 2))).expand(b * h, kmax, *dense.shape[2:])
                )
                src_rows = gathered[valid]
            pool = torch.zeros(total_pages * p, *src_rows.shape[1:], dtype=data.dtype, device=data.device)
            pool[dst] = src_rows
            new_pools[name] = pool
        self.pools = new_pools
        self.lengths = counts.reshape(b, h).clone()
        self.page_table = table

    # ------------------------------------------------------------------ reading
    def slot_index(self, lmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat pool slot of entry ``j`` of every head, ``[B*H, Lmax]``, and the validity mask."""
        p = self.page_size
        lengths = self.lengths.reshape(-1)
        lmax = int(lengths.max()) if lmax is None else lmax
        j = torch.arange(lmax)
        valid = j[None, :] < lengths[:, None]
        page_col = (j // p).clamp_max(max(self.page_table.shape[1] - 1, 0))
        if self.page_table.shape[1] == 0:
            return torch.zeros(lengths.numel(), lmax, dtype=torch.long), valid
        pages = self.page_table[:, page_col]
        slots = pages * p + (j % p)[None, :]
        slots = torch.where(valid, slots, torch.zeros_like(slots))
        return slots, valid

    def gather(self, names: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Padded ``[B, H, Lmax, ...]`` copies of the channels (pad slots hold garbage) and ``valid [B, H, Lmax]``."""
        slots, valid = self.slot_index()
        out = {}
        for name in names or tuple(self.pools):
            pool = self.pools[name]
            flat = pool[slots.to(pool.device).reshape(-1)]
            out[name] = flat.view(self.batch, self.heads, slots.shape[1], *pool.shape[1:])
        return out, valid.view(self.batch, self.heads, -1)

    # ------------------------------------------------------------------ writing
    def append(self, channels: dict[str, torch.Tensor]) -> None:
        """Append ``q`` new entries ``[B, H, q, ...]`` to every head (allocating pages as needed)."""
        first = next(iter(channels.values()))
        q = first.shape[2]
        p = self.page_size
        lengths = self.lengths.reshape(-1)
        need = (lengths + q + p - 1) // p
        have = (self.page_table >= 0).sum(1)
        extra = (need - have).clamp_min(0)
        n_new = int(extra.sum())
        if n_new:
            total = self._num_pages()
            new_ids = total + torch.arange(n_new)
            width = int(need.max())
            if width > self.page_table.shape[1]:
                pad = torch.full((self.page_table.shape[0], width - self.page_table.shape[1]), -1, dtype=torch.long)
                self.page_table = torch.cat([self.page_table, pad], 1)
            offsets = torch.cumsum(extra, 0) - extra
            for row in torch.nonzero(extra).flatten().tolist():
                k = int(extra[row])
                start = int(have[row])
                self.page_table[row, start : start + k] = new_ids[int(offsets[row]) : int(offsets[row]) + k]
            for name, pool in self.pools.items():
                grow = torch.zeros(n_new * p, *pool.shape[1:], dtype=pool.dtype, device=pool.device)
                self.pools[name] = torch.cat([pool, grow], 0)
        t = lengths[:, None] + torch.arange(q)[None, :]  # [BH, q] entry indices
        slots = self.page_table.gather(1, t // p) * p + t % p
        for name, data in channels.items():
            if name not in self.pools:
                raise KeyError(f"unknown channel {name!r}")
            rows = data.reshape(self.batch * self.heads * q, *data.shape[3:])
            self.pools[name][slots.reshape(-1).to(self.pools[name].device)] = rows.to(self.pools[name].dtype)
        self.lengths = self.lengths + q

    def keep(self, keep: torch.Tensor, counts: torch.Tensor) -> None:
        """Keep entries ``keep[b, h, :counts[b, h]]`` (indices into each head's current entries), compacting."""
        slots, _ = self.slot_index()
        b, h = self.batch, self.heads
        kmax = keep.shape[-1]
        flat_keep = keep.reshape(b * h, kmax).clamp_min(0).cpu()
        src_slots = slots.gather(1, flat_keep.clamp_max(max(slots.shape[1] - 1, 0))) if slots.shape[1] else flat_keep
        self._write_compact(self.pools, src_slots, counts.to(torch.long).cpu(), source_flat=True)

    def add_channel(self, name: str, fill: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        """Add a per-entry scalar channel (e.g. accumulated attention) aligned with the existing entries."""
        size = self._num_pages() * self.page_size
        device = next(iter(self.pools.values())).device if self.pools else "cpu"
        self.pools[name] = torch.full((size,), fill, dtype=dtype, device=device)

    # ------------------------------------------------------------------ accounting
    def _num_pages(self) -> int:
        return int((self.page_table >= 0).sum())

    def nbytes(self, names: tuple[str, ...] | None = None) -> int:
        """Bytes held by the pools (walks the tensors), optionally only some channels."""
        return sum(t.numel() * t.element_size() for n, t in self.pools.items() if names is None or n in names)

    def index_nbytes(self) -> int:
        return self.page_table.numel() * self.page_table.element_size() + self.lengths.numel() * 8

    def check(self) -> None:
        """Assert the layout invariants (used by tests)."""
        p = self.page_size
        pages = (self.page_table >= 0).sum(1)
        expected = (self.lengths.reshape(-1) + p - 1) // p
        assert torch.equal(pages, expected), (pages, expected)
        used = self.page_table[self.page_table >= 0]
        assert used.numel() == used.unique().numel(), "a page is owned twice"
        for pool in self.pools.values():
            assert pool.shape[0] == self._num_pages() * p, "pool holds pages no head owns"


def pages_for(length: int, page_size: int) -> int:
    return math.ceil(length / page_size)
