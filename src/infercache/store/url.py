"""``infercache.store.open``: build a tier (or a tiered stack) from a URL."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from .base import BlobStore
from .disk import DiskStore
from .memory import MemoryStore
from .tiered import TieredStore

SUPPORTED_FORMS = ("memory://  |  disk:PATH or disk://PATH (disk: alone = the default folder)  |  "
                   "redis://host:port/db (also rediss://, unix://)  |  a comma-separated list of these, fastest "
                   "first, e.g. 'memory://,disk:/var/cache/kv,redis://localhost:6379/0'. Per-tier options go in a "
                   "query string, e.g. 'memory://?max_bytes=2GiB'")

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20,
               "mb": 10**6, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}
_SIZE_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def default_disk_path() -> Path:
    """``infercache_home() / "kv"``."""
    from .._home import infercache_home

    return infercache_home() / "kv"


def parse_size(value: int | str) -> int:
    """``1048576``, ``"512MiB"``, ``"2G"`` (binary), ``"2GB"`` (decimal) -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = _SIZE_PATTERN.fullmatch(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"cannot read the size {value!r}: use bytes or a number with K/M/G/T, KiB/MiB/GiB/TiB "
                             "(binary) or KB/MB/GB/TB (decimal)")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise TypeError(f"size must be an int or a string like '2GiB', got {type(value).__name__}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def _parse_bool(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false/1/0), got {value!r}")


_MEMORY_OPTIONS: dict[str, Callable[[Any], Any]] = {"max_bytes": parse_size}
_DISK_OPTIONS: dict[str, Callable[[Any], Any]] = {"max_bytes": parse_size, "fsync": _parse_bool}
_REDIS_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "prefix": str, "ttl": int, "strict": _parse_bool, "timeout": float, "connect_timeout": float,
    "retry_after": float, "client": lambda client: client,
}


def open_store(url: str, **options: Any) -> BlobStore:
    """Open a tier from ``url``; see :data:`SUPPORTED_FORMS`.

    For a single tier, ``options`` go to its constructor (``max_bytes``, ``fsync``, ``prefix``, ``ttl``,
    ``strict``...). For a comma-separated list they go to :class:`TieredStore` (``write``, ``promote``) and each
    tier takes its own options from its query string.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"empty store URL; supported forms: {SUPPORTED_FORMS}")
    parts = [part.strip() for part in url.split(",")]
    if len(parts) == 1:
        return _open_tier(parts[0], options)
    if any(not part for part in parts):
        raise ValueError(f"empty tier in store URL {url!r}; supported forms: {SUPPORTED_FORMS}")
    tiers: list[BlobStore] = []
    try:
        for part in parts:
            tiers.append(_open_tier(part, {}))
        return TieredStore(tiers, **options)
    except Exception:
        for tier in tiers:
            tier.close()
        raise


def _open_tier(spec: str, options: dict[str, Any]) -> BlobStore:
    base, _, query = spec.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    scheme = base.split(":", 1)[0].lower() if ":" in base else ""
    if scheme == "memory":
        if base[len("memory:"):] not in ("", "//"):
            raise ValueError(f"memory:// takes no path, got {spec!r}")
        return MemoryStore(**_options("memory://", _MEMORY_OPTIONS, params, options))
    if scheme == "disk":
        path = base[len("disk:"):]
        path = path[2:] if path.startswith("//") else path
        return DiskStore(path or default_disk_path(), **_options("disk:", _DISK_OPTIONS, params, options))
    if scheme in ("redis", "rediss", "unix"):
        from .redis_store import RedisStore

        ours = {name: params.pop(name) for name in list(params) if name in _REDIS_OPTIONS}
        server_url = base + ("?" + urlencode(params) if params else "")
        return RedisStore(server_url, **_options("redis://", _REDIS_OPTIONS, ours, options))
    raise ValueError(f"unsupported store URL {spec!r}; supported forms: {SUPPORTED_FORMS}")


def _options(form: str, allowed: dict[str, Callable[[Any], Any]], params: dict[str, str],
             options: dict[str, Any]) -> dict[str, Any]:
    merged = {**params, **options}
    unknown = sorted(set(merged) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {form}; allowed: {sorted(allowed)}")
    return {name: allowed[name](value) for name, value in merged.items()}
