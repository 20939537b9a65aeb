"""infercache.store.open: URL forms, options, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from infercache import store
from infercache.store import DiskStore, MemoryStore, RedisStore, TieredStore, parse_size


def test_memory_url() -> None:
    tier = store.open("memory://", max_bytes=1234)
    assert isinstance(tier, MemoryStore) and tier.max_bytes == 1234
    assert store.open("memory://?max_bytes=2KiB").max_bytes == 2048
    assert store.open("memory:").max_bytes == MemoryStore().max_bytes


def test_disk_url_forms(tmp_path: Path) -> None:
    plain = store.open(f"disk:{tmp_path / 'a'}")
    slashes = store.open(f"disk://{tmp_path / 'b'}?max_bytes=1MB&fsync=false")
    assert isinstance(plain, DiskStore) and plain.root == tmp_path / "a"
    assert slashes.root == tmp_path / "b" and slashes.max_bytes == 10**6 and slashes.fsync is False


def test_disk_default_path_is_under_infercache_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("INFERCACHE_HOME", str(tmp_path / "home"))
    for url in ("disk:", "disk://"):
        assert store.open(url).root == tmp_path / "home" / "kv"


def test_redis_url_keeps_our_options_out_of_the_server_url() -> None:
    tier = store.open("redis://localhost:6379/2?prefix=ic:v1:&ttl=60&strict=true&timeout=0.5")
    assert isinstance(tier, RedisStore)
    assert (tier.url, tier.prefix, tier.ttl, tier.strict) == ("redis://localhost:6379/2", "ic:v1:", 60, True)
    assert tier.client.connection_pool.connection_kwargs["db"] == 2
    tier.close()


def test_tiered_url(tmp_path: Path) -> None:
    tier = store.open(f"memory://?max_bytes=1M, disk:{tmp_path}, redis://127.0.0.1:6379/0", write="back")
    assert isinstance(tier, TieredStore) and tier.write == "back"
    assert [type(t) for t in tier.tiers] == [MemoryStore, DiskStore, RedisStore]
    assert tier.tiers[0].max_bytes == 1 << 20 and tier.tiers[1].root == tmp_path
    tier.close()


@pytest.mark.parametrize("url, match", [
    ("s3://bucket/kv", "unsupported store URL 's3://bucket/kv'.*memory://.*disk:PATH.*redis://"),
    ("/just/a/path", "unsupported store URL"),
    ("", "empty store URL"),
    ("memory://,", "empty tier"),
    ("memory://somewhere", "takes no path"),
    ("memory://?size=1", r"unknown option\(s\) \['size'\] for memory://"),
    ("memory://?max_bytes=lots", "cannot read the size"),
])
def test_bad_urls_explain_themselves(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        store.open(url)


def test_unknown_keyword_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown option"):
        store.open(f"disk:{tmp_path}", ttl=5)


@pytest.mark.parametrize("text, expected", [
    (4096, 4096), ("4096", 4096), ("512MiB", 512 << 20), ("2G", 2 << 30), ("2GB", 2 * 10**9), ("1.5k", 1536),
    (" 3 TiB ", 3 << 40),
])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "0", "12 parsecs", "1e3"])
def test_parse_size_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
