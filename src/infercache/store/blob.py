"""Self-describing KV blobs: a safetensors file with one tensor per layer for keys and values.

Layout: tensor ``k.{layer}`` and ``v.{layer}`` of shape ``[kv_heads, tokens, head_dim]`` (no batch dimension: a blob
holds one sequence; TP-agnostic). ``encode`` also accepts ``[1, kv_heads, tokens, head_dim]`` and drops the batch.
With ``lossy="int8"`` the tensors are int8 and ``k.{layer}.scale`` / ``v.{layer}.scale`` (float32,
``[kv_heads, tokens]``) hold the per-(head, token) scales. With ``compress`` set, the uncompressed safetensors file
above is compressed and stored as a single uint8 tensor ``payload`` of an outer safetensors file.

All metadata lives in the safetensors header (``__metadata__``, str -> str), see :data:`HEADER_FIELDS`. The
``checksum`` is SHA-256 over the canonical JSON of the header (without ``checksum``/``mac``) followed by the
data section, so any flipped bit in header or tensors is caught before a tensor is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import lzma
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from .errors import BlobVersionError, ChecksumMismatchError, CorruptBlobError
from .keys import canonical_json
from .quant import INT8_SCHEME, dequantize_int8, quantize_int8

FORMAT_NAME = "infercache.kv"
BLOB_FORMAT_VERSION = 1
LAYOUT = "kv_heads,tokens,head_dim"

#: Metadata fields written into the safetensors header.
HEADER_FIELDS = ("format", "format_version", "namespace", "num_tokens", "num_layers", "start", "dtype", "layout",
                 "compression", "lossy", "quant", "payload_size", "extra", "checksum", "mac")

Compression = Literal["zlib", "lzma"]
Lossy = Literal["int8"]
KVLayers = list[tuple[torch.Tensor, torch.Tensor]]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_COMPRESSIONS = ("zlib", "lzma")
_LOSSY = ("int8",)
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_CHECKSUM_TAG = b"infercache/kv-blob\x00"
_SEALED_FIELDS = ("checksum", "mac")


@dataclass
class BlobMeta:
    """Metadata of a KV blob.

    The caller sets ``namespace`` (a :meth:`Namespace.digest`), ``start`` (absolute position of the first token)
    and ``extra`` (JSON-serializable, e.g. the chunk key). The other fields are filled by :func:`encode` (values set
    there are ignored) and read back by :func:`decode`.
    """

    namespace: str
    start: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    num_tokens: int = 0
    num_layers: int = 0
    dtype: str = ""
    compression: str | None = None
    lossy: str | None = None
    format_version: int = BLOB_FORMAT_VERSION
    checksum: str = ""


def encode(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], meta: BlobMeta, compress: Compression | None = None,
           lossy: Lossy | None = None, *, secret: bytes | None = None, level: int | None = None) -> bytes:
    """Serialize per-layer ``(keys, values)`` into a blob.

    ``compress``: ``None`` | ``"zlib"`` | ``"lzma"`` (lossless; ``level`` defaults to 1 for speed).
    ``lossy``: ``None`` | ``"int8"`` (only when asked; recorded in the header). ``secret`` adds an HMAC-SHA256 that
    :func:`decode` checks when given the same secret.
    """
    if compress not in (None, *_COMPRESSIONS):
        raise ValueError(f"compress must be None, 'zlib' or 'lzma', got {compress!r}")
    if lossy not in (None, *_LOSSY):
        raise ValueError(f"lossy must be None or 'int8', got {lossy!r}")
    if not isinstance(meta, BlobMeta):
        raise TypeError(f"meta must be a BlobMeta, got {type(meta).__name__}")
    if not isinstance(meta.namespace, str) or not meta.namespace:
        raise ValueError("meta.namespace must be a non-empty namespace digest")
    if not isinstance(meta.extra, dict):
        raise TypeError(f"meta.extra must be a dict, got {type(meta.extra).__name__}")
    if not isinstance(meta.start, int) or meta.start < 0:
        raise ValueError(f"meta.start must be a non-negative int, got {meta.start!r}")
    layers = _normalize(kv)
    dtype = layers[0][0].dtype
    tensors: dict[str, torch.Tensor] = {}
    for index, (keys, values) in enumerate(layers):
        for name, tensor in (("k", keys), ("v", values)):
            if lossy == "int8":
                quantized, scale = quantize_int8(tensor)
                tensors[f"{name}.{index}"] = quantized
                tensors[f"{name}.{index}.scale"] = scale
            else:
                tensors[f"{name}.{index}"] = tensor
    header_meta = {
        "format": FORMAT_NAME,
        "format_version": str(BLOB_FORMAT_VERSION),
        "namespace": meta.namespace,
        "num_tokens": str(layers[0][0].shape[1]),
        "num_layers": str(len(layers)),
        "start": str(meta.start),
        "dtype": _DTYPE_NAMES[dtype],
        "layout": LAYOUT,
        "compression": compress or "none",
        "lossy": lossy or "none",
        "extra": canonical_json(meta.extra),
    }
    if lossy == "int8":
        header_meta["quant"] = INT8_SCHEME
    inner = safetensors.torch.save(tensors, metadata=None if compress else header_meta)
    if compress is None:
        return _seal(inner, secret)
    packed = _compress(inner, compress, level)
    header_meta["payload_size"] = str(len(inner))
    outer = safetensors.numpy.save({"payload": np.frombuffer(packed, dtype=np.uint8)}, metadata=header_meta)
    return _seal(outer, secret)


def decode(blob: bytes | bytearray | memoryview, *, secret: bytes | None = None) -> tuple[KVLayers, BlobMeta]:
    """Parse and verify a blob; returns ``([(keys, values), ...], meta)`` with tensors ``[kv_heads, tokens, dim]``.

    Raises :class:`CorruptBlobError` (or its subclasses :class:`BlobVersionError`, :class:`ChecksumMismatchError`)
    for anything truncated, malformed, of another format version, or failing the checksum / HMAC.
    """
    try:
        return _decode(bytes(blob), secret)
    except CorruptBlobError:
        raise
    except Exception as exc:  # anything unexpected in a blob is corruption, never a crash with a half-built KV
        raise CorruptBlobError(f"malformed KV blob: {type(exc).__name__}: {exc}") from exc


def _normalize(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> KVLayers:
    """Check shapes/dtypes and return CPU, contiguous ``[kv_heads, tokens, head_dim]`` tensors."""
    if isinstance(kv, (str, bytes)) or len(kv) == 0:
        raise ValueError("kv must be a non-empty sequence of (keys, values) pairs, one per layer")
    layers: KVLayers = []
    dtype: torch.dtype | None = None
    num_tokens: int | None = None
    for index, pair in enumerate(kv):
        if len(pair) != 2:
            raise ValueError(f"kv[{index}] must be a (keys, values) pair, got {len(pair)} items")
        fixed = []
        for name, tensor in zip("kv", pair):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"kv[{index}] {name}: expected a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() == 4 and tensor.shape[0] == 1:
                tensor = tensor[0]
            if tensor.dim() != 3:
                raise ValueError(f"kv[{index}] {name}: expected shape [kv_heads, tokens, head_dim] (or batch 1 in "
                                 f"front), got {tuple(tensor.shape)}")
            if tensor.dtype not in _DTYPE_NAMES:
                raise TypeError(f"kv[{index}] {name}: dtype {tensor.dtype} not supported; use one of "
                                f"{sorted(DTYPES)}")
            dtype = dtype or tensor.dtype
            if tensor.dtype != dtype:
                raise TypeError(f"kv[{index}] {name}: dtype {tensor.dtype} differs from layer 0's {dtype}")
            num_tokens = tensor.shape[1] if num_tokens is None else num_tokens
            if tensor.shape[1] != num_tokens:
                raise ValueError(f"kv[{index}] {name}: {tensor.shape[1]} tokens, layer 0 has {num_tokens}")
            fixed.append(tensor.detach().cpu().contiguous())
        if fixed[0].shape[0] != fixed[1].shape[0]:
            raise ValueError(f"kv[{index}]: keys have {fixed[0].shape[0]} heads, values {fixed[1].shape[0]}")
        layers.append((fixed[0], fixed[1]))
    if not num_tokens:
        raise ValueError("kv holds zero tokens: there is nothing to store")
    return layers


def _compress(data: bytes, method: str, level: int | None) -> bytes:
    if method == "zlib":
        return zlib.compress(data, 1 if level is None else level)
    return lzma.compress(data, preset=1 if level is None else level)


def _decompress(data: bytes, method: str, expected_size: int) -> bytes:
    """Decompress, refusing to produce more than ``expected_size`` bytes (no decompression bombs)."""
    if method == "zlib":
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, expected_size + 1)
        complete = inflater.eof and not inflater.unconsumed_tail
    elif method == "lzma":
        inflater = lzma.LZMADecompressor()
        out = inflater.decompress(data, expected_size + 1)
        complete = inflater.eof
    else:
        raise CorruptBlobError(f"unknown compression {method!r} (supported: {', '.join(_COMPRESSIONS)})")
    if len(out) != expected_size or not complete:
        raise CorruptBlobError(f"compressed payload does not inflate to the recorded {expected_size} bytes")
    return out


def _split(blob: bytes) -> tuple[dict[str, Any], memoryview]:
    """Return ``(header, data section)`` after bounds checks, without trusting any offset."""
    if len(blob) < 8:
        raise CorruptBlobError(f"truncated KV blob: {len(blob)} bytes, not even a header length")
    (header_size,) = struct.unpack("<Q", blob[:8])
    if header_size < 2 or header_size > min(len(blob) - 8, _MAX_HEADER_BYTES):
        raise CorruptBlobError(f"truncated or malformed KV blob: header length {header_size}, blob {len(blob)} bytes")
    try:
        header = json.loads(blob[8:8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptBlobError(f"KV blob header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CorruptBlobError("KV blob header has no __metadata__: not an infercache KV blob")
    return header, memoryview(blob)[8 + header_size:]


def _digest(header: dict[str, Any], data: memoryview, secret: bytes | None) -> str:
    """SHA-256 (or HMAC-SHA256 with ``secret``) over the canonical header minus seal fields, then the data."""
    unsealed = dict(header)
    unsealed["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if k not in _SEALED_FIELDS}
    prefix = _CHECKSUM_TAG + canonical_json(unsealed).encode("ascii")
    digest = hmac.new(secret, digestmod="sha256") if secret is not None else hashlib.sha256()
    digest.update(prefix)
    digest.update(data)
    return digest.hexdigest()


def _seal(blob: bytes, secret: bytes | None) -> bytes:
    """Add ``checksum`` (and ``mac``) to the header of a safetensors blob, keeping the data section as is."""
    header, data = _split(blob)
    metadata = header["__metadata__"]
    metadata["checksum"] = "sha256:" + _digest(header, data, None)
    if secret is not None:
        metadata["mac"] = "hmac-sha256:" + _digest(header, data, secret)
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    return b"".join((struct.pack("<Q", len(raw)), raw, data))


def _verify(header: dict[str, Any], data: memoryview, secret: bytes | None) -> None:
    metadata = header["__metadata__"]
    if metadata.get("format") != FORMAT_NAME:
        raise CorruptBlobError(f"not an infercache KV blob (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(BLOB_FORMAT_VERSION):
        raise BlobVersionError(f"KV blob format version {version!r} is not supported (this code reads "
                               f"{BLOB_FORMAT_VERSION})")
    expected_data = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                        default=0)
    if len(data) != expected_data:
        raise CorruptBlobError(f"truncated KV blob: header describes {expected_data} data bytes, found {len(data)}")
    recorded = metadata.get("checksum", "")
    if not hmac.compare_digest(recorded, "sha256:" + _digest(header, data, None)):
        raise ChecksumMismatchError("KV blob checksum mismatch: the blob was altered or damaged")
    if secret is not None:
        mac = metadata.get("mac")
        if mac is None:
            raise ChecksumMismatchError("KV blob has no HMAC but a secret was given: refusing an unsigned blob")
        if not hmac.compare_digest(mac, "hmac-sha256:" + _digest(header, data, secret)):
            raise ChecksumMismatchError("KV blob HMAC mismatch: wrong secret, or the blob was tampered with")


def _decode(blob: bytes, secret: bytes | None) -> tuple[KVLayers, BlobMeta]:
    header, data = _split(blob)
    _verify(header, data, secret)
    metadata = header["__metadata__"]
    compression = metadata["compression"]
    lossy = metadata["lossy"]
    if compression not in ("none", *_COMPRESSIONS):
        raise CorruptBlobError(f"unknown compression {compression!r} (supported: {', '.join(_COMPRESSIONS)})")
    if lossy not in ("none", *_LOSSY):
        raise CorruptBlobError(f"unknown lossy scheme {lossy!r}")
    if lossy == "int8" and metadata.get("quant") != INT8_SCHEME:
        raise CorruptBlobError(f"unknown int8 quantization {metadata.get('quant')!r}")
    dtype = DTYPES.get(metadata["dtype"])
    if dtype is None:
        raise CorruptBlobError(f"unknown dtype {metadata['dtype']!r}")
    if metadata.get("layout") != LAYOUT:
        raise CorruptBlobError(f"unknown layout {metadata.get('layout')!r} (expected {LAYOUT!r})")
    num_layers = int(metadata["num_layers"])
    num_tokens = int(metadata["num_tokens"])
    tensors = safetensors.torch.load(blob)
    if compression != "none":
        payload = tensors.get("payload")
        if payload is None or len(tensors) != 1:
            raise CorruptBlobError("compressed KV blob must hold exactly one 'payload' tensor")
        inner = _decompress(payload.numpy().tobytes(), compression, int(metadata["payload_size"]))
        tensors = safetensors.torch.load(inner)
    expected = {f"{n}.{i}" for i in range(num_layers) for n in "kv"}
    if lossy == "int8":
        expected |= {f"{name}.scale" for name in expected}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors))[:4], sorted(set(tensors) - expected)[:4]
        raise CorruptBlobError(f"KV blob tensors do not match {num_layers} layers (missing {missing}, unexpected "
                               f"{unexpected})")
    layers: KVLayers = []
    for index in range(num_layers):
        pair = []
        for name in "kv":
            tensor = tensors[f"{name}.{index}"]
            if lossy == "int8":
                scale = tensors[f"{name}.{index}.scale"]
                if tensor.dtype != torch.int8 or scale.shape != tensor.shape[:2]:
                    raise CorruptBlobError(f"{name}.{index}: int8 tensor/scale shapes or dtypes are inconsistent")
                tensor = dequantize_int8(tensor, scale, dtype)
            if tensor.dtype != dtype or tensor.dim() != 3 or tensor.shape[1] != num_tokens:
                raise CorruptBlobError(f"{name}.{index}: got {tensor.dtype} {tuple(tensor.shape)}, header says "
                                       f"{metadata['dtype']} with {num_tokens} tokens")
            pair.append(tensor)
        layers.append((pair[0], pair[1]))
    extra = json.loads(metadata["extra"])
    if not isinstance(extra, dict):
        raise CorruptBlobError("KV blob 'extra' metadata is not a JSON object")
    meta = BlobMeta(
        namespace=metadata["namespace"],
        start=int(metadata["start"]),
        extra=extra,
        num_tokens=num_tokens,
        num_layers=num_layers,
        dtype=metadata["dtype"],
        compression=None if compression == "none" else compression,
        lossy=None if lossy == "none" else lossy,
        format_version=int(metadata["format_version"]),
        checksum=metadata["checksum"],
    )
    return layers, meta
