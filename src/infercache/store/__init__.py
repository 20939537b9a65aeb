"""Content-addressed KV store: keys, a safetensors blob format, and memory / disk / Redis tiers.

>>> from infercache import store
>>> tier = store.open("memory://,disk:/tmp/kv")            # doctest: +SKIP
>>> kv_store = store.KVStore(tier, namespace)               # doctest: +SKIP

See ``docs/store.md`` for the URL syntax, the blob format and the failure semantics.
"""

from __future__ import annotations

from .base import BlobStore, StoreStats, check_key
from .blob import BLOB_FORMAT_VERSION, BlobMeta, decode, encode
from .disk import DiskStore
from .errors import (BlobVersionError, ChecksumMismatchError, CorruptBlobError, StoreError,
                     StoreUnavailableError)
from .keys import ChunkKey, Namespace, SegmentKey, chunk_keys, segment_keys
from .kvstore import KVLookup, KVStore, KVStoreStats
from .memory import MemoryStore
from .redis_store import RedisStore  # redis-py itself is imported only when a RedisStore is created
from .tiered import TieredStore
from .url import SUPPORTED_FORMS, open_store, parse_size

open = open_store  # noqa: A001 - ``infercache.store.open(url)`` is the public entry point


__all__ = [
    "BLOB_FORMAT_VERSION", "BlobMeta", "BlobStore", "BlobVersionError", "ChecksumMismatchError", "ChunkKey",
    "CorruptBlobError", "DiskStore", "KVLookup", "KVStore", "KVStoreStats", "MemoryStore", "Namespace",
    "RedisStore", "SUPPORTED_FORMS", "SegmentKey", "StoreError", "StoreStats", "StoreUnavailableError",
    "TieredStore", "check_key", "chunk_keys", "decode", "encode", "open", "open_store", "parse_size",
    "segment_keys",
]
