"""Shared tier on a Redis-protocol server (Redis, Valkey) through redis-py: one key per blob."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .base import BlobStore, check_key
from .errors import StoreUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "infercache:kv:"
T = TypeVar("T")


def redact_url(url: str) -> str:
    """Hide the password of ``redis://user:password@host`` for log messages."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


class RedisStore(BlobStore):
    """Blobs as Redis strings ``<prefix><key>``, with an optional TTL (seconds) refreshed by every put.

    By default (``strict=False``) an unreachable server, a timeout or any Redis error turns a get into a miss and a
    put into a dropped put: counted in ``stats().errors``, logged as one warning per outage, never raised. After a
    failure the server is not contacted again for ``retry_after`` seconds, so a dead Redis costs generation nothing.
    ``strict=True`` raises :class:`StoreUnavailableError` instead.

    Eviction happens inside Redis (``maxmemory-policy``), so ``stats().evictions`` stays 0 here. Use
    ``volatile-ttl`` (not ``allkeys-lru``) for prefix-chained chunks, see ``docs/store.md``.
    """

    def __init__(self, url: str = "redis://localhost:6379/0", *, prefix: str = DEFAULT_PREFIX, ttl: int | None = None,
                 strict: bool = False, timeout: float = 2.0, connect_timeout: float = 0.5, retry_after: float = 5.0,
                 client: Any = None) -> None:
        super().__init__()
        if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # pragma: no cover - redis is a declared extra
            raise ImportError("the Redis tier needs redis-py: pip install 'infercache[redis]'") from exc
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self.strict = strict
        self.retry_after = retry_after
        self._failures: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._owns_client = client is None
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 1))
        self._down_until = 0.0
        self._down = False
        self._state_lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The underlying ``redis.Redis`` client."""
        return self._client

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, action: str, operation: Callable[[], T], fallback: T) -> tuple[bool, T]:
        """Run ``operation``; returns ``(ok, result)`` and handles outages according to ``strict``."""
        if not self.strict and time.monotonic() < self._down_until:
            return False, fallback
        try:
            result = operation()
        except self._failures as exc:
            self._count(errors=1)
            if self.strict:
                raise StoreUnavailableError(f"Redis {action} failed at {redact_url(self.url)}: "
                                            f"{type(exc).__name__}: {exc}") from exc
            self._mark_down(action, exc)
            return False, fallback
        if self._down:
            with self._state_lock:
                if self._down:
                    self._down = False
                    logger.warning("Redis store %s is reachable again", redact_url(self.url))
        return True, result

    def _mark_down(self, action: str, exc: BaseException) -> None:
        with self._state_lock:
            self._down_until = time.monotonic() + self.retry_after
            first = not self._down
            self._down = True
        if first:
            logger.warning("Redis store %s unavailable (%s failed: %s: %s). Gets count as misses and puts are "
                           "dropped; retrying every %.0f s. Generation continues without this tier.",
                           redact_url(self.url), action, type(exc).__name__, exc, self.retry_after)
        else:
            logger.debug("Redis store %s still unavailable (%s: %s)", redact_url(self.url), action, exc)

    def get(self, key: str) -> bytes | None:
        name = self._name(key)
        ok, data = self._call("GET", lambda: self._client.get(name), None)
        if data is None:
            self._count(misses=1)
            return None
        self._count(hits=1)
        return bytes(data) if not isinstance(data, bytes) else data

    def put(self, key: str, data: bytes) -> bool:
        name = self._name(key)
        ok, _ = self._call("SET", lambda: self._client.set(name, bytes(data), ex=self.ttl), None)
        self._count(**({"puts": 1} if ok else {"dropped": 1}))
        return ok

    def contains(self, key: str) -> bool:
        name = self._name(key)
        _ok, found = self._call("EXISTS", lambda: self._client.exists(name), 0)
        return bool(found)

    def delete(self, key: str) -> bool:
        name = self._name(key)
        _ok, removed = self._call("DEL", lambda: self._client.delete(name), 0)
        return bool(removed)

    def keys(self) -> list[str]:
        """All keys under the prefix (a full ``SCAN``: meant for tools and tests, not the hot path)."""
        _ok, found = self._call("SCAN", self._scan, [])
        return found

    def nbytes(self) -> int:
        """Total value bytes under the prefix (``SCAN`` + ``STRLEN``; not for the hot path)."""

        def total() -> int:
            keys = self._scan()
            if not keys:
                return 0
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(self.prefix + key)
            return int(sum(pipe.execute()))

        _ok, size = self._call("STRLEN", total, 0)
        return size

    def _scan(self) -> list[str]:
        names = self._client.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000)
        return [(n.decode() if isinstance(n, bytes) else n)[len(self.prefix):] for n in names]

    def ping(self) -> bool:
        """Whether the server answers now (ignores the retry window)."""
        try:
            return bool(self._client.ping())
        except self._failures:
            return False

    def close(self) -> None:
        if self._owns_client:
            try:
                self._client.close()
            except self._failures:
                pass


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)
