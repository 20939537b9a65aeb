"""Content-addressed keys for KV chunks.

Every key is a full SHA-256 hex digest (64 characters) over a canonical byte encoding, so it is identical in
every process, on every machine and across Python versions. Python's salted ``hash`` and pickle are never used.

Two key families:

* **prefix keys** (:func:`chunk_keys`): chunk ``i`` commits to every token before it and to the namespace, so a
  hit on chunk ``i`` means the whole prefix matches (exact reuse, vLLM/LMCache semantics);
* **segment keys** (:func:`segment_keys`): each caller-defined segment is hashed on its own, independent of its
  position, so the same document can be found at a new offset (approximate reuse needs a repair step later).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

#: Version of the key derivation. Bump it when the byte encoding below changes: old entries then simply miss.
KEY_FORMAT_VERSION = 1

#: Default tokens per chunk (LMCache's default).
DEFAULT_CHUNK_SIZE = 256

_NAMESPACE_TAG = b"infercache/namespace\x00"
_PREFIX_TAG = b"infercache/prefix-chunk\x00"
_SEGMENT_TAG = b"infercache/segment\x00"
_SEGMENT_CHAIN_TAG = b"infercache/segment-chain\x00"
_MAX_TOKEN_ID = 2**32 - 1

PartialPolicy = Literal["keep", "drop"]


def canonical_json(value: Any) -> str:
    """Serialize ``value`` as canonical JSON: sorted keys, no spaces, ASCII only, no NaN/inf."""
    return json.dumps(_canonical(value, "value"), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def _canonical(value: Any, where: str) -> Any:
    """Turn ``value`` into plain JSON types (tuples become lists, numpy scalars become Python numbers)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{where}: non-finite number {number!r} cannot be hashed canonically")
        return int(number) if number.is_integer() else number
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: mapping keys must be str, got {type(k).__name__} ({k!r})")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serializable; use str, int, float, bool, None, "
                    "lists or str-keyed dicts")


@dataclass(frozen=True)
class Namespace:
    """Everything that makes stored KV valid for a model; KV from different namespaces never shares a key.

    ``rope`` holds the RoPE parameters (type, theta, scaling...) as a plain dict; it is canonicalized, so key order
    and ``1.0`` vs ``1`` do not matter. ``tenant_salt`` isolates tenants that share a store.
    """

    model_id: str
    weights_hash: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: Mapping[str, Any] = field(default_factory=dict)
    tokenizer_hash: str = ""
    format_version: int = KEY_FORMAT_VERSION
    tenant_salt: str | None = None

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("Namespace.model_id must be a non-empty string")
        if not self.dtype:
            raise ValueError("Namespace.dtype must be a non-empty string such as 'bfloat16'")
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Namespace.{name} must be a positive int, got {value!r}")
        if not isinstance(self.rope, Mapping):
            raise TypeError(f"Namespace.rope must be a dict of RoPE parameters, got {type(self.rope).__name__}")
        object.__setattr__(self, "rope", _canonical(dict(self.rope), "Namespace.rope"))

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain, canonical dict (what the digest is computed over)."""
        return {
            "model_id": self.model_id,
            "weights_hash": self.weights_hash,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope": self.rope,
            "tokenizer_hash": self.tokenizer_hash,
            "format_version": self.format_version,
            "tenant_salt": self.tenant_salt,
        }

    @property
    def _digest_bytes(self) -> bytes:
        return hashlib.sha256(_NAMESPACE_TAG + canonical_json(self.as_dict()).encode("ascii")).digest()

    def digest(self) -> str:
        """SHA-256 hex digest of the canonical JSON of all fields; stable across processes and machines."""
        return self._digest_bytes.hex()

    def __hash__(self) -> int:
        return int.from_bytes(self._digest_bytes[:8], "big")

    @classmethod
    def from_config(cls, config: Any, *, model_id: str, weights_hash: str, dtype: str, tokenizer_hash: str = "",
                    tenant_salt: str | None = None) -> "Namespace":
        """Build a namespace from a Hugging Face ``PretrainedConfig`` (layers, KV heads, head_dim, RoPE fields)."""
        num_layers = int(config.num_hidden_layers)
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        rope: dict[str, Any] = {}
        for name in ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
                     "max_position_embeddings"):
            value = getattr(config, name, None)
            if value is not None:
                rope[name] = value
        return cls(model_id=model_id, weights_hash=weights_hash, dtype=dtype, num_layers=num_layers,
                   num_kv_heads=num_kv_heads, head_dim=int(head_dim), rope=rope, tokenizer_hash=tokenizer_hash,
                   tenant_salt=tenant_salt)


@dataclass(frozen=True)
class ChunkKey:
    """The key of tokens ``[start, end)``; ``partial`` marks a tail chunk shorter than ``chunk_size``."""

    key: str
    index: int
    start: int
    end: int
    partial: bool = False

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SegmentKey:
    """The key of one caller-defined segment at tokens ``[start, end)`` of the concatenation.

    ``key`` depends only on the segment's tokens and the namespace (position-independent). ``chain_key`` (set when
    chaining was asked for) also commits to every earlier segment.
    """

    key: str
    index: int
    start: int
    end: int
    chain_key: str | None = None

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def token_bytes(token_ids: Any, what: str = "token_ids") -> bytes:
    """Encode token ids as little-endian uint32 bytes, after checking they are a non-empty 1-D list of ids."""
    if hasattr(token_ids, "detach"):  # torch.Tensor, without importing torch here
        token_ids = token_ids.detach().cpu().numpy()
    array = np.asarray(token_ids)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{what} is empty: there is nothing to key")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{what} must contain integers, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > _MAX_TOKEN_ID:
        raise ValueError(f"{what} must lie in [0, 2**32), got values in [{low}, {high}]")
    return array.astype("<u4").tobytes()


def _check_namespace(namespace: Namespace) -> bytes:
    if not isinstance(namespace, Namespace):
        raise TypeError(f"namespace must be an infercache.store.keys.Namespace, got {type(namespace).__name__}")
    return namespace._digest_bytes


def chunk_keys(token_ids: Any, namespace: Namespace, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
               partial: PartialPolicy = "keep") -> list[ChunkKey]:
    """Prefix-chained keys of consecutive ``chunk_size``-token chunks.

    ``key_i = sha256(tag || key_{i-1} || u32le(n_i) || u32le(tokens of chunk i) || namespace digest)`` with
    ``key_{-1}`` = the namespace digest, so chunk ``i``'s key commits to all tokens before it.

    ``partial="keep"`` (default) returns a shorter tail chunk flagged ``partial=True``: short prompts (fewer than
    ``chunk_size`` tokens) then still get a key and can hit on an exact repeat, and nothing is dropped silently.
    ``partial="drop"`` leaves the tail out (LMCache's ``save_unfull_chunk=False`` behaviour).
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if partial not in ("keep", "drop"):
        raise ValueError(f"partial must be 'keep' or 'drop', got {partial!r}")
    ns = _check_namespace(namespace)
    data = token_bytes(token_ids)
    total = len(data) // 4
    keys: list[ChunkKey] = []
    previous = ns
    for index, start in enumerate(range(0, total, chunk_size)):
        end = min(start + chunk_size, total)
        is_partial = end - start < chunk_size
        if is_partial and partial == "drop":
            break
        digest = hashlib.sha256()
        digest.update(_PREFIX_TAG)
        digest.update(previous)
        digest.update((end - start).to_bytes(4, "little"))
        digest.update(data[4 * start:4 * end])
        digest.update(ns)
        previous = digest.digest()
        keys.append(ChunkKey(key=previous.hex(), index=index, start=start, end=end, partial=is_partial))
    return keys


def segment_keys(segments: Sequence[Any], namespace: Namespace, *, chained: bool = False) -> list[SegmentKey]:
    """Position-independent keys of caller-defined segments (e.g. RAG documents), in order.

    ``key = sha256(tag || namespace digest || u32le(n) || u32le(tokens))``: the same segment gets the same key
    wherever it appears. With ``chained=True`` each entry also gets ``chain_key = sha256(tag || previous chain_key
    || key)`` (starting from the namespace digest), which identifies the segment *and* everything before it.
    """
    if isinstance(segments, (str, bytes)):
        raise TypeError("segments must be a sequence of token-id sequences, not a string")
    segments = list(segments)
    if not segments:
        raise ValueError("segments is empty: pass at least one token-id sequence")
    ns = _check_namespace(namespace)
    keys: list[SegmentKey] = []
    previous = ns
    offset = 0
    for index, segment in enumerate(segments):
        data = token_bytes(segment, what=f"segments[{index}]")
        count = len(data) // 4
        content = hashlib.sha256(_SEGMENT_TAG + ns + count.to_bytes(4, "little") + data).digest()
        chain_key = None
        if chained:
            previous = hashlib.sha256(_SEGMENT_CHAIN_TAG + previous + content).digest()
            chain_key = previous.hex()
        keys.append(SegmentKey(key=content.hex(), index=index, start=offset, end=offset + count, chain_key=chain_key))
        offset += count
    return keys
