"""DiskStore: atomic writes, crash leftovers, restart-safe index, LRU budget, disk full."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from infercache.store import DiskStore
from infercache.store.disk import TMP_PREFIX


def blob(tag: str, size: int = 100) -> bytes:
    return (tag.encode() * size)[:size]


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def set_access_order(store: DiskStore, keys: list[str]) -> None:
    """Give ``keys`` strictly increasing mtimes (coarse file-system clocks could tie otherwise)."""
    for offset, key in enumerate(keys):
        stamp = 1_700_000_000_000_000_000 + offset * 1_000_000_000
        os.utime(store.path_for(key), ns=(stamp, stamp))


def test_round_trip_with_fan_out_layout(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "kv")
    assert store.get("abc") is None
    assert store.put("abc", b"payload")
    path = store.path_for("abc")
    assert path.is_file() and path.name == "abc.safetensors"
    assert len(path.relative_to(tmp_path / "kv").parts) == 3  # aa/bb/<key>.safetensors
    assert store.get("abc") == b"payload" and store.contains("abc") and len(store) == 1
    assert store.nbytes() == 7 and store.keys() == ["abc"]
    assert store.delete("abc") and not path.exists() and not store.delete("abc")
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.puts) == (1, 1, 1)


def test_restart_keeps_hits(tmp_path: Path) -> None:
    first = DiskStore(tmp_path)
    for key in ("k1", "k2", "k3"):
        first.put(key, blob(key))
    first.close()
    second = DiskStore(tmp_path)
    assert sorted(second.keys()) == ["k1", "k2", "k3"] and second.nbytes() == 300
    assert second.get("k2") == blob("k2") and second.stats().hits == 1


def test_crash_leftovers_are_cleaned_on_open(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    store.put("good", blob("good"))
    folder = store.path_for("lost").parent
    folder.mkdir(parents=True, exist_ok=True)
    leftover = folder / f"{TMP_PREFIX}lost.1234.deadbeef"
    leftover.write_bytes(b"half a blo")  # what a crash between write and rename leaves behind
    (tmp_path / "README.txt").write_text("not a blob")  # foreign files are ignored, not deleted
    reopened = DiskStore(tmp_path)
    assert not leftover.exists()
    assert reopened.keys() == ["good"] and reopened.get("lost") is None
    assert reopened.get("good") == blob("good") and (tmp_path / "README.txt").exists()


def test_lru_eviction_under_budget(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=300)
    for key in ("a", "b", "c"):
        store.put(key, blob(key))
    set_access_order(store, ["a", "b", "c"])
    store = DiskStore(tmp_path, max_bytes=300)  # reopen: order comes from the files
    assert store.keys() == ["a", "b", "c"]
    assert store.get("a") == blob("a")  # touching a makes b the oldest
    store.put("d", blob("d"))
    assert sorted(store.keys()) == ["a", "c", "d"]
    assert not store.path_for("b").exists() and store.stats().evictions == 1
    assert store.nbytes() <= 300 and sum(p.stat().st_size for p in files(tmp_path)) <= 300


def test_reopening_with_a_smaller_budget_evicts_oldest(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    for key in ("a", "b", "c", "d"):
        store.put(key, blob(key))
    set_access_order(store, ["c", "a", "d", "b"])
    smaller = DiskStore(tmp_path, max_bytes=200)
    assert smaller.keys() == ["d", "b"] and len(files(tmp_path)) == 2


def test_disk_full_drops_the_put_and_keeps_old_entries(tmp_path: Path, monkeypatch, caplog) -> None:
    store = DiskStore(tmp_path)
    store.put("old1", blob("old1"))
    store.put("old2", blob("old2"))

    def half_write_then_full(self: DiskStore, temp: Path, data: bytes) -> None:
        temp.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskStore, "_write_durably", half_write_then_full)
    with caplog.at_level(logging.DEBUG, logger="infercache.store.disk"):
        assert store.put("new", blob("new")) is False
        assert store.put("new2", blob("new2")) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
    assert store.get("old1") == blob("old1") and store.get("old2") == blob("old2")
    assert store.get("new") is None and "new" not in store.keys()
    assert not [p for p in files(tmp_path) if p.name.startswith(TMP_PREFIX)], "no half-written file may remain"
    stats = store.stats()
    assert (stats.errors, stats.dropped, stats.puts) == (2, 2, 2)
    assert store.nbytes() == 200


def test_permission_error_on_rename_is_a_dropped_put(tmp_path: Path, monkeypatch) -> None:
    store = DiskStore(tmp_path)
    store.put("keep", b"v1")

    def refuse(*_args, **_kwargs) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("infercache.store.disk.os.replace", refuse)
    assert store.put("keep", b"v2") is False
    monkeypatch.undo()
    assert store.get("keep") == b"v1"
    assert [p.name for p in files(tmp_path)] == ["keep.safetensors"]


def test_file_evicted_by_another_process_is_a_miss(tmp_path: Path) -> None:
    ours, theirs = DiskStore(tmp_path), DiskStore(tmp_path)
    ours.put("shared", b"data")
    assert theirs.get("shared") == b"data"  # not in its index yet, found on disk
    theirs.delete("shared")
    assert ours.get("shared") is None and "shared" not in ours.keys() and ours.nbytes() == 0


def test_oversized_blob_is_dropped(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=10)
    assert store.put("big", b"x" * 11) is False and files(tmp_path) == []


def test_unusable_folder_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot create the disk store folder"):
        DiskStore(tmp_path / "file" / "kv")
