"""Several tiers composed fastest-first (e.g. memory -> disk -> Redis)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

from .base import BlobStore, StoreStats, check_key
from .memory import MemoryStore

WritePolicy = Literal["through", "back"]


class TieredStore(BlobStore):
    """Looks tiers up in order and promotes a hit into every faster tier.

    ``write="through"`` (default): a put goes to every tier. ``write="back"``: a put goes to the first tier only
    (which must report evictions, e.g. :class:`MemoryStore`); entries written that way reach the slower tiers when
    the first tier evicts them, on :meth:`flush` and on :meth:`close`.
    """

    def __init__(self, tiers: Sequence[BlobStore], *, write: WritePolicy = "through", promote: bool = True) -> None:
        super().__init__()
        if not tiers:
            raise ValueError("TieredStore needs at least one tier")
        if write not in ("through", "back"):
            raise ValueError(f"write must be 'through' or 'back', got {write!r}")
        self.tiers = list(tiers)
        self.write = write
        self.promote = promote
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        if write == "back":
            first = self.tiers[0]
            if not hasattr(first, "on_evict"):
                raise ValueError(f"write='back' needs a first tier that reports evictions (MemoryStore), got "
                                 f"{type(first).__name__}")
            if getattr(first, "on_evict") is not None:
                raise ValueError("the first tier already has an eviction listener")
            first.on_evict = self._write_down  # type: ignore[attr-defined]

    def get(self, key: str) -> bytes | None:
        check_key(key)
        for level, tier in enumerate(self.tiers):
            data = tier.get(key)
            if data is not None:
                if self.promote:
                    for faster in self.tiers[:level]:
                        faster.put(key, data)
                self._count(hits=1)
                return data
        self._count(misses=1)
        return None

    def put(self, key: str, data: bytes) -> bool:
        check_key(key)
        if self.write == "back":
            stored = self.tiers[0].put(key, data)
            if stored:
                with self._dirty_lock:
                    self._dirty.add(key)
            else:  # too large for the first tier: go straight down
                stored = any([tier.put(key, data) for tier in self.tiers[1:]])
        else:
            stored = any([tier.put(key, data) for tier in self.tiers])
        self._count(**({"puts": 1} if stored else {"dropped": 1}))
        return stored

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def delete(self, key: str) -> bool:
        with self._dirty_lock:
            self._dirty.discard(key)
        return any([tier.delete(key) for tier in self.tiers])

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for tier in self.tiers:
            seen.update(dict.fromkeys(tier.keys()))
        return list(seen)

    def nbytes(self) -> int:
        """Sum over tiers (an entry held by two tiers counts twice)."""
        return sum(tier.nbytes() for tier in self.tiers)

    def tier_stats(self) -> list[StoreStats]:
        """Counters of each tier, fastest first."""
        return [tier.stats() for tier in self.tiers]

    def flush(self) -> None:
        """Write entries held only by the first tier (write-back) down to the slower tiers."""
        first = self.tiers[0]
        with self._dirty_lock:
            pending, self._dirty = self._dirty, set()
        held = dict(first.items()) if isinstance(first, MemoryStore) else None  # read without counting hits
        for key in pending:
            data = held.get(key) if held is not None else first.get(key)
            if data is not None:
                for tier in self.tiers[1:]:
                    tier.put(key, data)

    def close(self) -> None:
        if self.write == "back":
            self.flush()
        for tier in self.tiers:
            tier.close()

    def _write_down(self, key: str, data: bytes) -> None:
        with self._dirty_lock:
            if key not in self._dirty:
                return
            self._dirty.discard(key)
        for tier in self.tiers[1:]:
            tier.put(key, data)
