"""TieredStore: lookup order, promotion, write-through and write-back, a dead tier in the middle."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest

from infercache.store import DiskStore, MemoryStore, RedisStore, TieredStore


def test_hit_in_a_slow_tier_is_promoted(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path)
    disk.put("k", b"from disk")
    memory = MemoryStore()
    tiered = TieredStore([memory, disk])
    assert tiered.get("k") == b"from disk"
    assert memory.contains("k")
    assert tiered.get("k") == b"from disk"
    assert disk.stats().hits == 1, "the second get is served by memory"
    assert memory.stats().hits == 1 and tiered.stats().hits == 2


def test_promotion_goes_through_every_faster_tier() -> None:
    server = fakeredis.FakeServer()
    top, middle = MemoryStore(), MemoryStore()
    bottom = RedisStore("redis://fake/0", client=fakeredis.FakeRedis(server=server))
    bottom.put("k", b"v")
    tiered = TieredStore([top, middle, bottom])
    assert tiered.get("k") == b"v" and top.contains("k") and middle.contains("k")
    assert tiered.get("missing") is None and tiered.stats().misses == 1


def test_no_promotion_when_disabled(tmp_path: Path) -> None:
    disk, memory = DiskStore(tmp_path), MemoryStore()
    disk.put("k", b"v")
    assert TieredStore([memory, disk], promote=False).get("k") == b"v" and not memory.contains("k")


def test_write_through_reaches_every_tier(tmp_path: Path) -> None:
    memory, disk = MemoryStore(), DiskStore(tmp_path)
    tiered = TieredStore([memory, disk])
    assert tiered.put("k", b"v")
    assert memory.get("k") == b"v" and disk.get("k") == b"v"
    assert tiered.contains("k") and tiered.keys() == ["k"] and len(tiered) == 1 and tiered.nbytes() == 2
    assert tiered.delete("k") and not memory.contains("k") and not disk.contains("k")


def test_write_back_writes_down_on_eviction_and_close(tmp_path: Path) -> None:
    memory, disk = MemoryStore(max_bytes=4), DiskStore(tmp_path)
    tiered = TieredStore([memory, disk], write="back")
    tiered.put("a", b"aa")
    tiered.put("b", b"bb")
    assert not disk.contains("a") and not disk.contains("b")
    tiered.put("c", b"cc")  # evicts a from memory -> written down
    assert disk.get("a") == b"aa" and not disk.contains("b")
    tiered.close()
    reopened = DiskStore(tmp_path)
    assert sorted(reopened.keys()) == ["a", "b", "c"]


def test_write_back_needs_an_evicting_first_tier(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reports evictions"):
        TieredStore([DiskStore(tmp_path), MemoryStore()], write="back")
    with pytest.raises(ValueError, match="at least one tier"):
        TieredStore([])
    with pytest.raises(ValueError, match="write must be"):
        TieredStore([MemoryStore()], write="around")  # type: ignore[arg-type]


def test_a_dead_tier_does_not_break_the_others(tmp_path: Path, closed_redis_url: str) -> None:
    memory, disk, redis = MemoryStore(), DiskStore(tmp_path), RedisStore(closed_redis_url)
    tiered = TieredStore([memory, redis, disk])
    assert tiered.put("k", b"v")
    memory.delete("k")
    assert tiered.get("k") == b"v" and memory.contains("k")
    assert redis.stats().errors >= 1 and tiered.tier_stats()[1].dropped == 2  # the put and the promotion
