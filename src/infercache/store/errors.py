"""Exceptions raised by the KV store."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error raised by ``infercache.store``."""


class CorruptBlobError(StoreError, ValueError):
    """A KV blob is truncated, malformed, of an unknown version, or fails its integrity check."""


class BlobVersionError(CorruptBlobError):
    """A KV blob was written by a format version this code cannot read."""


class ChecksumMismatchError(CorruptBlobError):
    """A KV blob's bytes do not match its recorded SHA-256 checksum (or HMAC)."""


class StoreUnavailableError(StoreError, ConnectionError):
    """A remote tier cannot be reached (raised only by tiers opened with ``strict=True``)."""
