"""The small interface every storage tier implements, and its counters."""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def check_key(key: str) -> str:
    """Return ``key`` if it is usable by every tier (also as a file name), else raise ``ValueError``."""
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(f"invalid store key {key!r}: use 1-200 characters from [A-Za-z0-9_.-], not starting "
                         "with '.', '_' or '-' (content keys are hex digests)")
    return key


@dataclass
class StoreStats:
    """Counters of one tier since it was opened.

    ``errors`` counts failed operations (I/O errors, an unreachable server); ``dropped`` counts puts that were not
    stored (error, or a blob larger than the whole budget); ``evictions`` counts entries removed to stay in budget.
    """

    hits: int = 0
    misses: int = 0
    puts: int = 0
    dropped: int = 0
    evictions: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class BlobStore(ABC):
    """A key -> bytes tier. Implementations never raise I/O trouble into the caller unless told to be strict."""

    def __init__(self) -> None:
        self._stats = StoreStats()
        self._stats_lock = threading.Lock()

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, amount in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + amount)

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None`` on a miss (or when the tier is unavailable)."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` (replacing it); ``False`` when the put was dropped."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether ``key`` is stored (does not count as a hit or miss)."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` if it was there."""

    @abstractmethod
    def keys(self) -> list[str]:
        """All stored keys (order unspecified)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of blob data held by this tier."""

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        with self._stats_lock:
            return StoreStats(**self._stats.as_dict())

    def close(self) -> None:
        """Release resources; the default does nothing."""

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.contains(key)

    def __enter__(self) -> "BlobStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
