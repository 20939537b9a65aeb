"""The safetensors blob format: round trips, compression, int8, and corruption detection."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors
import torch

from infercache.store import BlobMeta, BlobVersionError, ChecksumMismatchError, CorruptBlobError, decode, encode
from infercache.store.blob import _seal, _split

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def meta(**extra) -> BlobMeta:
    return BlobMeta(namespace="n" * 64, start=7, extra=extra)


@pytest.mark.parametrize("compress", [None, "zlib", "lzma"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(make_kv, dtype, compress) -> None:
    kv = make_kv(5, dtype)
    blob = encode(kv, meta(key="abc", positions=[7, 8]), compress)
    out, info = decode(blob)
    assert len(out) == len(kv)
    for (k, v), (k2, v2) in zip(kv, out):
        assert k2.dtype == dtype and v2.dtype == dtype
        assert torch.equal(k.view(torch.uint8 if dtype == torch.float32 else torch.int16),
                           k2.view(torch.uint8 if dtype == torch.float32 else torch.int16))
        assert torch.equal(v, v2)
    assert (info.namespace, info.start, info.num_tokens, info.num_layers) == ("n" * 64, 7, 5, 3)
    assert info.dtype == str(dtype).removeprefix("torch.")
    assert info.compression == compress and info.lossy is None
    assert info.extra == {"key": "abc", "positions": [7, 8]}
    assert info.checksum.startswith("sha256:") and len(info.checksum) == 7 + 64


def test_special_values_survive(make_kv) -> None:
    kv = make_kv(4, torch.bfloat16)
    kv[0][0][0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")])
    out, _ = decode(encode(kv, meta()))
    assert torch.equal(kv[0][0].view(torch.int16), out[0][0].view(torch.int16))


def test_batch_of_one_is_dropped(make_kv) -> None:
    kv = make_kv(3)
    out, _ = decode(encode([(k[None], v[None]) for k, v in kv], meta()))
    assert out[0][0].shape == kv[0][0].shape and torch.equal(out[0][0], kv[0][0])


def test_blob_is_a_plain_safetensors_file(make_kv, tmp_path) -> None:
    path = tmp_path / "chunk.safetensors"
    path.write_bytes(encode(make_kv(4), meta()))
    with safetensors.safe_open(str(path), "pt") as handle:
        header = handle.metadata()
        assert sorted(handle.keys()) == ["k.0", "k.1", "k.2", "v.0", "v.1", "v.2"]
        assert list(handle.get_slice("k.1").get_shape()) == [2, 4, 8]
    assert header["format"] == "infercache.kv" and header["format_version"] == "1"
    assert header["layout"] == "kv_heads,tokens,head_dim" and header["compression"] == "none"
    assert header["lossy"] == "none" and header["num_tokens"] == "4" and header["start"] == "7"


@pytest.mark.parametrize("compress", ["zlib", "lzma"])
def test_lossless_compression_shrinks_redundant_kv(compress) -> None:
    kv = [(torch.zeros(2, 64, 8), torch.ones(2, 64, 8)) for _ in range(2)]
    plain, packed = encode(kv, meta()), encode(kv, meta(), compress)
    assert len(packed) < len(plain) / 4
    out, info = decode(packed)
    assert info.compression == compress and all(torch.equal(a, b) for p, q in zip(kv, out) for a, b in zip(p, q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", [None, "zlib"])
def test_int8_error_is_bounded_and_flagged(make_kv, dtype, compress, tmp_path) -> None:
    kv = make_kv(16, dtype)
    blob = encode(kv, meta(), compress, lossy="int8")
    out, info = decode(blob)
    assert info.lossy == "int8" and info.dtype == str(dtype).removeprefix("torch.")
    (tmp_path / "int8.safetensors").write_bytes(blob)
    with safetensors.safe_open(str(tmp_path / "int8.safetensors"), "pt") as handle:
        assert handle.metadata()["lossy"] == "int8" and handle.metadata()["quant"] == "absmax-per-head-token"
    relative_rounding = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    for original, restored in ((t, r) for p, q in zip(kv, out) for t, r in zip(p, q)):
        assert restored.dtype == dtype
        x = original.float()
        absmax = x.abs().amax(dim=-1, keepdim=True)
        bound = absmax / 254 + x.abs() * relative_rounding * 2 + 1e-12
        assert bool(((restored.float() - x).abs() <= bound).all())
        assert not torch.equal(restored, original), "int8 must actually be lossy here"
    assert len(encode(make_kv(64), meta(), lossy="int8")) < 0.45 * len(encode(make_kv(64), meta()))


def test_int8_zero_rows_and_non_finite_input() -> None:
    kv = [(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))]
    out, _ = decode(encode(kv, meta(), lossy="int8"))
    assert torch.equal(out[0][0], kv[0][0])
    with pytest.raises(ValueError, match="finite"):
        encode([(torch.full((1, 2, 4), float("nan")), torch.zeros(1, 2, 4))], meta(), lossy="int8")


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 20, "half", "minus1"])
def test_truncated_blobs_are_detected(make_kv, cut) -> None:
    blob = encode(make_kv(4), meta())
    length = {"half": len(blob) // 2, "minus1": len(blob) - 1}.get(cut, cut)
    with pytest.raises(CorruptBlobError):
        decode(blob[:length])


@pytest.mark.parametrize("compress", [None, "zlib"])
def test_every_single_bit_flip_is_detected(compress) -> None:
    kv = [(torch.randn(1, 3, 4), torch.randn(1, 3, 4))]
    blob = encode(kv, meta(), compress)
    for position in range(len(blob)):
        for bit in (0x01, 0x80):
            damaged = bytearray(blob)
            damaged[position] ^= bit
            with pytest.raises(CorruptBlobError):
                decode(bytes(damaged))
            if position > 64 and bit == 0x01:
                break  # past the length field one bit per byte keeps the test fast


def test_checksum_mismatch_names_itself(make_kv) -> None:
    blob = bytearray(encode(make_kv(4), meta()))
    blob[-1] ^= 0xFF
    with pytest.raises(ChecksumMismatchError, match="checksum"):
        decode(bytes(blob))


def _rewrite_metadata(blob: bytes, **changes: str) -> bytes:
    """Edit header fields and re-seal, so only the edited field can make decode fail."""
    header, data = _split(blob)
    header["__metadata__"].update(changes)
    for sealed in ("checksum", "mac"):
        header["__metadata__"].pop(sealed, None)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return _seal(struct.pack("<Q", len(raw)) + raw + bytes(data), None)


def test_wrong_version_is_rejected(make_kv) -> None:
    blob = encode(make_kv(2), meta())
    decode(_rewrite_metadata(blob))  # the helper itself produces valid blobs
    with pytest.raises(BlobVersionError, match="version '2'"):
        decode(_rewrite_metadata(blob, format_version="2"))


@pytest.mark.parametrize("changes, match", [
    ({"format": "something-else"}, "not an infercache KV blob"),
    ({"dtype": "float8"}, "dtype"),
    ({"num_layers": "4"}, "do not match 4 layers"),
    ({"num_tokens": "3"}, "header says"),
    ({"lossy": "int4"}, "lossy"),
    ({"compression": "zstd"}, "compression"),
    ({"layout": "tokens,kv_heads,head_dim"}, "layout"),
    ({"extra": "[1, 2]"}, "extra"),
])
def test_inconsistent_headers_are_rejected(make_kv, changes, match) -> None:
    with pytest.raises(CorruptBlobError, match=match):
        decode(_rewrite_metadata(encode(make_kv(2), meta()), **changes))


def test_foreign_and_garbage_bytes_are_rejected() -> None:
    plain = safetensors.torch.save({"weight": torch.zeros(2, 2)}, metadata={"format": "pt"})
    with pytest.raises(CorruptBlobError, match="not an infercache KV blob"):
        decode(plain)
    for garbage in (b"", b"\x00" * 8, b"\xff" * 64, struct.pack("<Q", 10) + b"not json!!"):
        with pytest.raises(CorruptBlobError):
            decode(garbage)


def test_decompression_bomb_is_refused(make_kv) -> None:
    blob = encode(make_kv(8), meta(), "zlib")
    with pytest.raises(CorruptBlobError, match="inflate"):
        decode(_rewrite_metadata(blob, payload_size="10"))


def test_hmac_secret(make_kv) -> None:
    kv = make_kv(3)
    signed = encode(kv, meta(), secret=b"tenant-secret")
    decode(signed, secret=b"tenant-secret")
    decode(signed)  # the checksum alone still verifies
    with pytest.raises(ChecksumMismatchError, match="HMAC mismatch"):
        decode(signed, secret=b"other-secret")
    with pytest.raises(ChecksumMismatchError, match="no HMAC"):
        decode(encode(kv, meta()), secret=b"tenant-secret")


@pytest.mark.parametrize("kv, error, match", [
    ([], ValueError, "non-empty"),
    ([(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))], ValueError, "tokens"),
    ([(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float16))], TypeError, "differs"),
    ([(torch.zeros(2, 3, 4, dtype=torch.int32),) * 2], TypeError, "not supported"),
    ([(torch.zeros(3, 4), torch.zeros(3, 4))], ValueError, "kv_heads, tokens, head_dim"),
    ([(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4))], ValueError, "zero tokens"),
    ([(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))], ValueError, "heads"),
])
def test_encode_validates_kv(kv, error, match) -> None:
    with pytest.raises(error, match=match):
        encode(kv, meta())


def test_encode_validates_options(make_kv) -> None:
    kv = make_kv(2)
    with pytest.raises(ValueError, match="compress"):
        encode(kv, meta(), "zstd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lossy"):
        encode(kv, meta(), lossy="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="namespace"):
        encode(kv, BlobMeta(namespace=""))
    with pytest.raises(ValueError, match="start"):
        encode(kv, BlobMeta(namespace="n", start=-1))
    with pytest.raises(TypeError, match="extra"):
        encode(kv, BlobMeta(namespace="n", extra=[1]))  # type: ignore[arg-type]
