"""RedisStore against fakeredis (always), a closed port, and a real redis-server (when installed)."""

from __future__ import annotations

import logging
import time

import fakeredis
import pytest

from infercache.store import RedisStore, StoreUnavailableError
from infercache.store.redis_store import redact_url


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def fake_store(server: fakeredis.FakeServer, **options) -> RedisStore:
    return RedisStore("redis://fake:6379/0", client=fakeredis.FakeRedis(server=server), **options)


def test_round_trip_on_fakeredis(fake_server) -> None:
    store = fake_store(fake_server)
    assert store.get("abc") is None
    assert store.put("abc", b"\x00blob\xff") and store.get("abc") == b"\x00blob\xff"
    assert store.contains("abc") and not store.contains("nope")
    assert store.client.get("infercache:kv:abc") == b"\x00blob\xff", "one Redis key per blob, under the prefix"
    store.put("def", b"12345")
    assert sorted(store.keys()) == ["abc", "def"] and len(store) == 2 and store.nbytes() == 11
    assert store.delete("abc") and not store.delete("abc")
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.puts, stats.errors) == (1, 1, 2, 0)


def test_prefixes_isolate_stores(fake_server) -> None:
    a, b = fake_store(fake_server, prefix="ic:a:"), fake_store(fake_server, prefix="ic:b*:")
    a.put("k", b"from a")
    b.put("k", b"from b")
    assert a.get("k") == b"from a" and b.get("k") == b"from b"
    assert a.keys() == ["k"] and b.keys() == ["k"]


def test_ttl_is_set(fake_server) -> None:
    store = fake_store(fake_server, ttl=60)
    store.put("k", b"v")
    assert 0 < store.client.ttl("infercache:kv:k") <= 60
    assert fake_store(fake_server).put("k2", b"v") and store.client.ttl("infercache:kv:k2") == -1
    with pytest.raises(ValueError, match="ttl"):
        fake_store(fake_server, ttl=0)


def test_outage_is_a_miss_logged_once(fake_server, caplog) -> None:
    store = fake_store(fake_server, retry_after=0.0)
    store.put("k", b"v")
    fake_server.connected = False
    with caplog.at_level(logging.WARNING, logger="infercache.store.redis_store"):
        assert store.get("k") is None
        assert store.put("k2", b"v2") is False
        assert store.contains("k") is False and store.keys() == [] and store.nbytes() == 0
    assert len(caplog.records) == 1 and "unavailable" in caplog.records[0].getMessage()
    stats = store.stats()
    assert stats.errors >= 2 and stats.misses == 1 and stats.dropped == 1
    fake_server.connected = True
    with caplog.at_level(logging.WARNING, logger="infercache.store.redis_store"):
        assert store.get("k") == b"v"
    assert "reachable again" in caplog.records[-1].getMessage()


def test_outage_backs_off(fake_server) -> None:
    store = fake_store(fake_server, retry_after=60.0)
    fake_server.connected = False
    assert store.get("k") is None
    fake_server.connected = True
    assert store.get("k") is None and store.stats().errors == 1, "no new attempt inside the retry window"


def test_strict_mode_raises(fake_server) -> None:
    store = fake_store(fake_server, strict=True)
    fake_server.connected = False
    with pytest.raises(StoreUnavailableError, match="Redis GET failed"):
        store.get("k")
    with pytest.raises(StoreUnavailableError, match="Redis SET failed"):
        store.put("k", b"v")


def test_closed_port_is_a_quick_miss(closed_redis_url) -> None:
    store = RedisStore(closed_redis_url)
    started = time.monotonic()
    assert store.get("k") is None
    assert store.put("k", b"v") is False
    assert store.contains("k") is False
    assert time.monotonic() - started < 3
    assert store.stats().errors == 1 and not store.ping()
    store.close()


def test_closed_port_strict_raises(closed_redis_url) -> None:
    with pytest.raises(StoreUnavailableError, match="Connection"):
        RedisStore(closed_redis_url, strict=True).get("k")


def test_password_is_redacted_in_messages() -> None:
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_real_server_round_trip(redis_server) -> None:
    store = RedisStore(redis_server.url, ttl=30)
    payload = bytes(range(256)) * 4096  # 1 MiB
    assert store.put("big", payload) and store.get("big") == payload
    assert store.keys() == ["big"] and store.nbytes() == len(payload)
    assert 0 < store.client.ttl("infercache:kv:big") <= 30
    store.close()


def test_real_server_going_down_and_back(redis_server) -> None:
    store = RedisStore(redis_server.url, retry_after=0.0)
    store.put("k", b"v")
    redis_server.stop()
    assert store.get("k") is None and store.put("k2", b"v2") is False
    assert store.stats().errors >= 1
    redis_server.start()  # same port, empty (no persistence)
    assert store.put("k3", b"v3") and store.get("k3") == b"v3"
    store.close()
