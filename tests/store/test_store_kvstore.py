"""KVStore: prefix round trips, corrupt entries as misses, namespace checks, dropped puts."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
import torch

from infercache.store import DiskStore, KVStore, MemoryStore, Namespace, TieredStore, segment_keys


def kv_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def prefix(kv, tokens: int):
    return [(k[:, :tokens], v[:, :tokens]) for k, v in kv]


def test_prefix_round_trip(namespace: Namespace, make_kv) -> None:
    store = KVStore(MemoryStore(), namespace, chunk_size=4)
    tokens = list(range(10))
    kv = make_kv(10)
    assert store.put_kv(tokens, kv) == 3
    found = store.get_kv(tokens)
    assert found.hit and found.num_tokens == 10 and kv_equal(found.kv, kv)
    assert [c.partial for c in found.chunks] == [False, False, True]
    assert store.put_kv(tokens, kv) == 0 and store.stats().chunks_skipped == 3


def test_longest_shared_prefix_is_returned(namespace: Namespace, make_kv) -> None:
    store = KVStore(MemoryStore(), namespace, chunk_size=4)
    kv = make_kv(12)
    store.put_kv(list(range(12)), kv)
    diverging = list(range(9)) + [99, 98, 97, 96]  # shares 9 tokens: two full chunks
    found = store.get_kv(diverging)
    assert found.num_tokens == 8 and kv_equal(found.kv, prefix(kv, 8))
    assert store.lookup(diverging) == 8
    assert store.get_kv([5, 6, 7]).num_tokens == 0 and store.get_kv([5, 6, 7]).kv is None
    stats = store.stats()
    assert stats.hit_tokens == 8 and stats.lookup_tokens == 13 + 3 + 3


def test_batch_of_one_and_bf16(make_kv, namespace: Namespace) -> None:
    ns = dataclasses.replace(namespace, dtype="torch.bfloat16")
    store = KVStore(MemoryStore(), ns, chunk_size=4)
    kv = make_kv(6, torch.bfloat16)
    store.put_kv(torch.arange(6), [(k[None], v[None]) for k, v in kv])
    assert kv_equal(store.get_kv(torch.arange(6)).kv, kv)


def test_corrupt_entry_is_a_miss_and_deleted(namespace: Namespace, make_kv, tmp_path: Path) -> None:
    disk = DiskStore(tmp_path)
    store = KVStore(disk, namespace, chunk_size=4)
    tokens, kv = list(range(12)), make_kv(12)
    store.put_kv(tokens, kv)
    keys = store.chunk_keys(tokens)
    damaged = bytearray(disk.get(keys[1].key))
    damaged[-5] ^= 0x10  # one flipped bit in a tensor
    disk.put(keys[1].key, bytes(damaged))
    found = store.get_kv(tokens)
    assert found.num_tokens == 4 and kv_equal(found.kv, prefix(kv, 4)), "stop before the bad chunk"
    assert store.stats().corrupt == 1 and not disk.contains(keys[1].key)
    store.put_kv(tokens, kv)  # heals
    assert store.get_kv(tokens).num_tokens == 12


def test_truncated_entry_is_a_miss(namespace: Namespace, make_kv) -> None:
    memory = MemoryStore()
    store = KVStore(memory, namespace, chunk_size=4)
    store.put_kv([1, 2, 3, 4], make_kv(4))
    key = store.chunk_keys([1, 2, 3, 4])[0].key
    memory.put(key, memory.get(key)[:100])
    assert store.get_kv([1, 2, 3, 4]).num_tokens == 0 and store.stats().corrupt == 1


def test_valid_blob_under_the_wrong_key_is_a_miss(namespace: Namespace, make_kv) -> None:
    memory = MemoryStore()
    store = KVStore(memory, namespace, chunk_size=4)
    tokens = list(range(8))
    store.put_kv(tokens, make_kv(8))
    first, second = store.chunk_keys(tokens)
    memory.put(second.key, memory.get(first.key))  # a swapped (but intact) blob
    assert store.get_kv(tokens).num_tokens == 4 and store.stats().corrupt == 1


def test_blob_from_another_namespace_is_a_miss(namespace: Namespace, make_kv) -> None:
    memory = MemoryStore()
    other = KVStore(memory, dataclasses.replace(namespace, tenant_salt="other"), chunk_size=4)
    ours = KVStore(memory, namespace, chunk_size=4)
    key = ours.chunk_keys([1, 2, 3, 4])[0].key
    other.put_chunk(key, make_kv(4), start=0)
    assert ours.get_kv([1, 2, 3, 4]).num_tokens == 0 and ours.stats().corrupt == 1


def test_secret_rejects_unsigned_blobs(namespace: Namespace, make_kv) -> None:
    memory = MemoryStore()
    KVStore(memory, namespace, chunk_size=4).put_kv([1, 2, 3, 4], make_kv(4))
    signed = KVStore(memory, namespace, chunk_size=4, secret=b"s3cret")
    assert signed.get_kv([1, 2, 3, 4]).num_tokens == 0 and signed.stats().corrupt == 1
    signed.put_kv([1, 2, 3, 4], make_kv(4))
    assert signed.get_kv([1, 2, 3, 4]).num_tokens == 4


def test_lossy_and_compressed_store(namespace: Namespace, make_kv) -> None:
    memory = MemoryStore()
    store = KVStore(memory, namespace, chunk_size=4, compress="zlib", lossy="int8")
    kv = make_kv(4)
    store.put_kv([1, 2, 3, 4], kv)
    found = store.get_kv([1, 2, 3, 4])
    assert found.num_tokens == 4 and not kv_equal(found.kv, kv)
    assert max(float((a - b).abs().max()) for p, q in zip(kv, found.kv) for a, b in zip(p, q)) < 0.05


def test_partial_drop_policy(namespace: Namespace, make_kv) -> None:
    store = KVStore(MemoryStore(), namespace, chunk_size=4, partial="drop")
    assert store.put_kv(list(range(10)), make_kv(10)) == 2
    assert store.get_kv(list(range(10))).num_tokens == 8


def test_dropped_puts_never_raise(namespace: Namespace, make_kv, tmp_path: Path, monkeypatch) -> None:
    def full(self, temp, data) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskStore, "_write_durably", full)
    store = KVStore(TieredStore([DiskStore(tmp_path)]), namespace, chunk_size=4)
    assert store.put_kv(list(range(8)), make_kv(8)) == 0
    assert store.stats().chunks_dropped == 2 and store.get_kv(list(range(8))).num_tokens == 0


def test_segments_are_found_at_a_new_offset(namespace: Namespace, make_kv) -> None:
    store = KVStore(MemoryStore(), namespace)
    doc = [40, 41, 42]
    key = segment_keys([doc], namespace)[0].key
    kv = make_kv(3)
    store.put_chunk(key, kv, start=17, extra={"kind": "segment"})
    later = segment_keys([[1, 2], doc], namespace)[1]
    loaded, meta = store.get_chunk(later.key)
    assert kv_equal(loaded, kv) and meta.start == 17 and meta.extra["kind"] == "segment"


@pytest.mark.parametrize("change, match", [
    ({"layers": 2}, "layers"), ({"heads": 3}, "heads"), ({"dim": 4}, "dims"), ({"dtype": torch.float16}, "dtype"),
])
def test_kv_must_fit_the_namespace(namespace: Namespace, make_kv, change, match) -> None:
    store = KVStore(MemoryStore(), namespace, chunk_size=4)
    with pytest.raises(ValueError, match=match):
        store.put_kv([1, 2, 3, 4], make_kv(4, **change))


def test_token_count_must_match(namespace: Namespace, make_kv) -> None:
    with pytest.raises(ValueError, match="5 token ids"):
        KVStore(MemoryStore(), namespace).put_kv([1, 2, 3, 4, 5], make_kv(4))
    with pytest.raises(ValueError, match="chunk_size"):
        KVStore(MemoryStore(), namespace, chunk_size=0)
