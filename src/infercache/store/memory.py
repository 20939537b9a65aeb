"""In-process LRU tier under a byte budget."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from .base import BlobStore, check_key

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB

EvictionListener = Callable[[str, bytes], None]


class MemoryStore(BlobStore):
    """Keeps blobs in a dict, evicting the least recently used ones once ``max_bytes`` would be exceeded.

    ``on_evict(key, data)`` is called (outside the lock) for each entry evicted for space; :class:`TieredStore`
    uses it for write-back.
    """

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES, *, on_evict: EvictionListener | None = None) -> None:
        super().__init__()
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
        self._count(**({"hits": 1} if data is not None else {"misses": 1}))
        return data

    def put(self, key: str, data: bytes) -> bool:
        check_key(key)
        data = bytes(data)
        if len(data) > self.max_bytes:
            logger.debug("memory store: blob %s (%d bytes) exceeds the %d-byte budget; dropped", key, len(data),
                         self.max_bytes)
            self._count(dropped=1)
            return False
        evicted: list[tuple[str, bytes]] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._size -= len(old)
            while self._entries and self._size + len(data) > self.max_bytes:
                victim, victim_data = self._entries.popitem(last=False)
                self._size -= len(victim_data)
                evicted.append((victim, victim_data))
            self._entries[key] = data
            self._size += len(data)
        self._count(puts=1, evictions=len(evicted))
        if self.on_evict is not None:
            for victim, victim_data in evicted:
                self.on_evict(victim, victim_data)
        return True

    def contains(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return key in self._entries

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            data = self._entries.pop(key, None)
            if data is not None:
                self._size -= len(data)
        return data is not None

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def items(self) -> list[tuple[str, bytes]]:
        """``(key, data)`` pairs from least to most recently used."""
        with self._lock:
            return list(self._entries.items())

    def nbytes(self) -> int:
        with self._lock:
            return self._size

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size = 0
