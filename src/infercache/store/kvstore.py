"""KV tensors in, KV tensors out: chunk keys + blob encoding on top of any tier."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .base import BlobStore
from .blob import BlobMeta, Compression, KVLayers, Lossy, decode, encode
from .errors import CorruptBlobError
from .keys import DEFAULT_CHUNK_SIZE, ChunkKey, Namespace, PartialPolicy, chunk_keys

logger = logging.getLogger(__name__)


@dataclass
class KVLookup:
    """Result of :meth:`KVStore.get_kv`: the longest stored prefix.

    ``kv`` holds per-layer ``(keys, values)`` of shape ``[kv_heads, num_tokens, head_dim]`` covering tokens
    ``[0, num_tokens)``, or ``None`` when nothing matched.
    """

    num_tokens: int
    kv: KVLayers | None
    chunks: list[ChunkKey] = field(default_factory=list)

    @property
    def hit(self) -> bool:
        return self.num_tokens > 0


@dataclass
class KVStoreStats:
    """Token-level counters of a :class:`KVStore` (the tier keeps its own byte-level counters)."""

    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    chunks_hit: int = 0
    chunks_stored: int = 0
    chunks_skipped: int = 0
    chunks_dropped: int = 0
    corrupt: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class KVStore:
    """Stores the KV of token prefixes in a tier under content-addressed chunk keys.

    A blob that fails to decode, or that belongs to another key/namespace/shape, is a **miss**: it is deleted from
    the tier and counted in ``stats().corrupt``; it never becomes wrong output.
    """

    def __init__(self, tier: BlobStore, namespace: Namespace, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 partial: PartialPolicy = "keep", compress: Compression | None = None, lossy: Lossy | None = None,
                 secret: bytes | None = None) -> None:
        if not isinstance(namespace, Namespace):
            raise TypeError(f"namespace must be a Namespace, got {type(namespace).__name__}")
        self.tier = tier
        self.namespace = namespace
        self.chunk_size = chunk_size
        self.partial = partial
        self.compress = compress
        self.lossy = lossy
        self.secret = secret
        self._digest = namespace.digest()
        self._dtype_name = namespace.dtype.removeprefix("torch.")
        self._stats = KVStoreStats()
        self._lock = threading.Lock()
        chunk_keys([0], namespace, chunk_size, partial=partial)  # validate options now, not on first use

    # -- whole prefixes -----------------------------------------------------------------------------------------------
    def chunk_keys(self, token_ids: Any) -> list[ChunkKey]:
        """The chunk keys this store uses for ``token_ids``."""
        return self._keys_and_length(token_ids)[0]

    def _keys_and_length(self, token_ids: Any) -> tuple[list[ChunkKey], int]:
        keys = chunk_keys(token_ids, self.namespace, self.chunk_size, partial="keep")
        total = keys[-1].end
        if self.partial == "drop" and keys[-1].partial:
            keys = keys[:-1]
        return keys, total

    def put_kv(self, token_ids: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
               skip_existing: bool = True) -> int:
        """Store the KV of ``token_ids`` chunk by chunk; returns the number of chunks written.

        ``kv``: per-layer ``(keys, values)`` of shape ``[kv_heads, tokens, head_dim]`` (or with a batch of 1 in
        front) for positions ``[0, len(token_ids))``. Chunks already present are skipped unless
        ``skip_existing=False``. A dropped put (full disk, Redis down) is counted, never raised.
        """
        keys, total = self._keys_and_length(token_ids)
        layers = self._check_layers(kv, total)
        written = 0
        for chunk in keys:
            if skip_existing and self.tier.contains(chunk.key):
                self._add(chunks_skipped=1)
                continue
            piece = [(k[:, chunk.start:chunk.end], v[:, chunk.start:chunk.end]) for k, v in layers]
            if self.put_chunk(chunk.key, piece, start=chunk.start,
                              extra={"chunk_index": chunk.index, "partial": chunk.partial}):
                written += 1
        return written

    def get_kv(self, token_ids: Any) -> KVLookup:
        """Load the longest stored prefix of ``token_ids`` (consecutive chunk hits from the start)."""
        keys, total = self._keys_and_length(token_ids)
        hits: list[ChunkKey] = []
        pieces: list[KVLayers] = []
        for chunk in keys:
            found = self.get_chunk(chunk.key, start=chunk.start, num_tokens=chunk.num_tokens)
            if found is None:
                break
            hits.append(chunk)
            pieces.append(found[0])
        covered = hits[-1].end if hits else 0
        self._add(lookups=1, lookup_tokens=total, hit_tokens=covered, chunks_hit=len(hits))
        if not pieces:
            return KVLookup(num_tokens=0, kv=None)
        if len(pieces) == 1:
            merged = pieces[0]
        else:
            merged = [(torch.cat([p[i][0] for p in pieces], dim=1), torch.cat([p[i][1] for p in pieces], dim=1))
                      for i in range(len(pieces[0]))]
        return KVLookup(num_tokens=covered, kv=merged, chunks=hits)

    def lookup(self, token_ids: Any) -> int:
        """How many leading tokens of ``token_ids`` are stored (existence checks only, nothing is loaded)."""
        covered = 0
        for chunk in self.chunk_keys(token_ids):
            if not self.tier.contains(chunk.key):
                break
            covered = chunk.end
        return covered

    # -- single chunks (also for segment keys) ------------------------------------------------------------------------
    def put_chunk(self, key: str, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], *, start: int = 0,
                  extra: dict[str, Any] | None = None) -> bool:
        """Encode ``kv`` (tokens at absolute positions ``start...``) and store it under ``key``."""
        layers = self._check_layers(kv, None)
        meta = BlobMeta(namespace=self._digest, start=start, extra={**(extra or {}), "key": key})
        blob = encode(layers, meta, self.compress, self.lossy, secret=self.secret)
        stored = self.tier.put(key, blob)
        self._add(**({"chunks_stored": 1} if stored else {"chunks_dropped": 1}))
        return stored

    def get_chunk(self, key: str, *, start: int | None = None,
                  num_tokens: int | None = None) -> tuple[KVLayers, BlobMeta] | None:
        """Load and verify one chunk; ``None`` on a miss or when the stored blob is corrupt or does not fit."""
        data = self.tier.get(key)
        if data is None:
            return None
        try:
            kv, meta = decode(data, secret=self.secret)
            self._check_meta(key, kv, meta, start, num_tokens)
        except CorruptBlobError as exc:
            self._add(corrupt=1)
            logger.warning("KV store: entry %s is unusable (%s); deleted and treated as a miss", key, exc)
            self.tier.delete(key)
            return None
        return kv, meta

    def stats(self) -> KVStoreStats:
        with self._lock:
            return KVStoreStats(**self._stats.as_dict())

    def close(self) -> None:
        self.tier.close()

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- checks -------------------------------------------------------------------------------------------------------
    def _check_layers(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], num_tokens: int | None) -> KVLayers:
        """Drop a batch of 1 and check the KV against the namespace (a mismatch is a caller bug: ValueError)."""
        ns = self.namespace
        if len(kv) != ns.num_layers:
            raise ValueError(f"kv has {len(kv)} layers, namespace {ns.model_id!r} has {ns.num_layers}")
        layers: KVLayers = []
        for index, (keys, values) in enumerate(kv):
            keys = keys[0] if keys.dim() == 4 and keys.shape[0] == 1 else keys
            values = values[0] if values.dim() == 4 and values.shape[0] == 1 else values
            for name, tensor in (("keys", keys), ("values", values)):
                if tensor.dim() != 3:
                    raise ValueError(f"layer {index} {name}: expected [kv_heads, tokens, head_dim], "
                                     f"got {tuple(tensor.shape)}")
                heads, tokens, dim = tensor.shape
                if heads != ns.num_kv_heads or dim != ns.head_dim:
                    raise ValueError(f"layer {index} {name}: {heads} heads x {dim} dims, namespace says "
                                     f"{ns.num_kv_heads} x {ns.head_dim}")
                if num_tokens is not None and tokens != num_tokens:
                    raise ValueError(f"layer {index} {name}: {tokens} tokens but {num_tokens} token ids were given")
                if str(tensor.dtype).removeprefix("torch.") != self._dtype_name:
                    raise ValueError(f"layer {index} {name}: dtype {tensor.dtype}, namespace says {ns.dtype}")
            layers.append((keys, values))
        return layers

    def _check_meta(self, key: str, kv: KVLayers, meta: BlobMeta, start: int | None, num_tokens: int | None) -> None:
        problems = []
        if meta.namespace != self._digest:
            problems.append("namespace differs")
        if meta.extra.get("key") != key:
            problems.append("stored under another key")
        if start is not None and meta.start != start:
            problems.append(f"start {meta.start} != {start}")
        if num_tokens is not None and meta.num_tokens != num_tokens:
            problems.append(f"{meta.num_tokens} tokens != {num_tokens}")
        if meta.dtype != self._dtype_name or len(kv) != self.namespace.num_layers:
            problems.append(f"{meta.dtype} x {len(kv)} layers does not match the namespace")
        elif any(k.shape[0] != self.namespace.num_kv_heads or k.shape[2] != self.namespace.head_dim
                 or v.shape[0] != self.namespace.num_kv_heads or v.shape[2] != self.namespace.head_dim
                 for k, v in kv):
            problems.append("head count or head_dim does not match the namespace")
        if problems:
            raise CorruptBlobError("blob does not fit: " + "; ".join(problems))

    def _add(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + amount)
