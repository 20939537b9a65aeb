"""MemoryStore: LRU order, byte budget, counters."""

from __future__ import annotations

import random

import pytest

from infercache.store import MemoryStore


def test_round_trip_and_counters() -> None:
    store = MemoryStore(max_bytes=1000)
    assert store.get("a") is None
    assert store.put("a", b"xyz") and store.get("a") == b"xyz"
    assert store.contains("a") and "a" in store and not store.contains("b")
    assert len(store) == 1 and store.nbytes() == 3 and store.keys() == ["a"]
    assert store.delete("a") and not store.delete("a")
    assert store.stats().as_dict() == {"hits": 1, "misses": 1, "puts": 1, "dropped": 0, "evictions": 0,
                                       "errors": 0}


def test_lru_evicts_least_recently_used_first() -> None:
    store = MemoryStore(max_bytes=30)
    for key in "abc":
        store.put(key, key.encode() * 10)
    store.get("a")  # a is now the most recently used
    store.put("d", b"d" * 10)
    assert store.keys() == ["c", "a", "d"]
    store.put("e", b"e" * 20)
    assert store.keys() == ["d", "e"]
    assert store.stats().evictions == 3 and store.nbytes() == 30


def test_replacing_a_key_updates_its_size() -> None:
    store = MemoryStore(max_bytes=100)
    store.put("a", b"1" * 60)
    store.put("a", b"2" * 10)
    assert store.nbytes() == 10 and store.get("a") == b"2" * 10


def test_byte_budget_always_holds() -> None:
    rng = random.Random(0)
    store = MemoryStore(max_bytes=5000)
    for step in range(500):
        key = f"k{rng.randrange(60)}"
        if rng.random() < 0.7:
            store.put(key, bytes(rng.randrange(1, 900)))
        else:
            store.get(key)
        assert store.nbytes() <= 5000
        assert store.nbytes() == sum(len(data) for _, data in store.items())


def test_oversized_blob_is_dropped_without_evicting() -> None:
    store = MemoryStore(max_bytes=10)
    store.put("small", b"12345")
    assert not store.put("huge", b"x" * 11)
    assert store.keys() == ["small"] and store.stats().dropped == 1


def test_eviction_listener_sees_victims() -> None:
    seen = []
    store = MemoryStore(max_bytes=4, on_evict=lambda key, data: seen.append((key, data)))
    store.put("a", b"aa")
    store.put("b", b"bb")
    store.put("c", b"cc")
    assert seen == [("a", b"aa")]


@pytest.mark.parametrize("key", ["", ".hidden", "a/b", "x" * 201, "ä", None])
def test_invalid_keys_are_rejected(key) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        MemoryStore().put(key, b"x")


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryStore(max_bytes=0)
