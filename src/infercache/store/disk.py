"""Embedded on-disk tier: one file per blob, atomic writes, LRU under a size budget, restart-safe."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

from .base import BlobStore, check_key

logger = logging.getLogger(__name__)

DEFAULT_DISK_BYTES = 10 << 30  # 10 GiB
BLOB_SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"


class DiskStore(BlobStore):
    """Blobs as files ``<root>/<aa>/<bb>/<key>.safetensors``, where ``aabb`` starts ``sha256(key)`` (fan-out).

    * Writes go to a temp file in the same folder, are fsync'ed and renamed into place (``os.replace``), so a
      reader never sees half a blob; temp files left by a crash are deleted when the store is opened.
    * The index (key -> size, LRU order by file mtime) is rebuilt by scanning the folder on open, so entries
      survive restarts. A read touches the file's mtime; eviction removes the least recently used files until the
      total is within ``max_bytes``.
    * A put that fails (disk full, permission denied, any ``OSError``) is dropped, counted and logged; existing
      entries are left untouched and no exception reaches the caller.

    Several processes may share a folder: each keeps its own index and budget (approximate), a file evicted by
    another process simply becomes a miss.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_DISK_BYTES, *, fsync: bool = True) -> None:
        super().__init__()
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self.root = Path(path).expanduser()
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()
        self._size = 0
        self._warned: set[tuple[str, int | None]] = set()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create the disk store folder {self.root}: {exc.strerror}") from exc
        self.refresh()

    # -- layout -----------------------------------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        """Where the blob of ``key`` lives."""
        fan = hashlib.sha256(check_key(key).encode("ascii")).hexdigest()
        return self.root / fan[:2] / fan[2:4] / f"{key}{BLOB_SUFFIX}"

    def refresh(self) -> None:
        """Rebuild the index from the folder (deleting stray temp files), then enforce the budget."""
        found: list[tuple[int, str, int]] = []
        removed = 0
        for folder, _subfolders, names in os.walk(self.root):
            for name in names:
                full = os.path.join(folder, name)
                if name.startswith(TMP_PREFIX):
                    removed += _unlink_quietly(full)
                    continue
                key = name[: -len(BLOB_SUFFIX)] if name.endswith(BLOB_SUFFIX) else None
                if key is None or not _valid_key(key) or Path(full) != self.path_for(key):
                    continue
                try:
                    info = os.stat(full)
                except OSError:
                    continue
                found.append((info.st_mtime_ns, key, info.st_size))
        found.sort()
        with self._lock:
            self._index = OrderedDict((key, size) for _mtime, key, size in found)
            self._size = sum(self._index.values())
        if removed:
            logger.info("disk store %s: removed %d half-written temp file(s) left by an interrupted write",
                        self.root, removed)
        self._evict_over_budget(keep=None)

    # -- BlobStore ----------------------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        path = self.path_for(key)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            self._forget(key)
            self._count(misses=1)
            return None
        except OSError as exc:
            self._count(misses=1, errors=1)
            self._log_failure("read", key, exc)
            return None
        try:
            os.utime(path)  # LRU clock: the mtime is the last access
        except OSError:
            pass
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            else:  # written by another process
                self._index[key] = len(data)
                self._size += len(data)
        self._count(hits=1)
        return data

    def put(self, key: str, data: bytes) -> bool:
        path = self.path_for(key)
        size = len(data)
        if size > self.max_bytes:
            logger.debug("disk store: blob %s (%d bytes) exceeds the %d-byte budget; dropped", key, size,
                         self.max_bytes)
            self._count(dropped=1)
            return False
        temp = path.parent / f"{TMP_PREFIX}{key}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_durably(temp, data)
            os.replace(temp, path)
            if self.fsync:
                _fsync_folder(path.parent)
        except OSError as exc:
            _unlink_quietly(temp)
            self._count(errors=1, dropped=1)
            self._log_failure("write", key, exc)
            return False
        with self._lock:
            old = self._index.pop(key, None)
            self._size += size - (old or 0)
            self._index[key] = size
        self._count(puts=1)
        self._evict_over_budget(keep=key)
        return True

    def contains(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> bool:
        path = self.path_for(key)
        self._forget(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._count(errors=1)
            self._log_failure("delete", key, exc)
            return False
        return True

    def keys(self) -> list[str]:
        """Keys known to this process, least recently used first (see :meth:`refresh`)."""
        with self._lock:
            return list(self._index)

    def nbytes(self) -> int:
        with self._lock:
            return self._size

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # -- internals ----------------------------------------------------------------------------------------------------
    def _write_durably(self, temp: Path, data: bytes) -> None:
        """Write ``data`` to a new file ``temp`` and fsync it (raises ``OSError`` on any failure)."""
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._size -= size

    def _evict_over_budget(self, keep: str | None) -> None:
        victims: list[str] = []
        with self._lock:
            for key in list(self._index):
                if self._size <= self.max_bytes:
                    break
                if key == keep:
                    continue
                self._size -= self._index.pop(key)
                victims.append(key)
        for key in victims:
            try:
                self.path_for(key).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._count(errors=1)
                self._log_failure("evict", key, exc)
        if victims:
            self._count(evictions=len(victims))

    def _log_failure(self, action: str, key: str, exc: OSError) -> None:
        """Warn once per (action, errno); later occurrences go to debug."""
        marker = (action, exc.errno)
        reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        message = "disk store %s: %s of %s failed (%s); %s"
        consequence = "the put was dropped, generation continues" if action == "write" else "treated as a miss"
        if marker in self._warned:
            logger.debug(message, self.root, action, key, reason, consequence)
        else:
            self._warned.add(marker)
            logger.warning(message + " (further failures of this kind are logged at debug level)", self.root,
                           action, key, reason, consequence)


def _valid_key(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def _unlink_quietly(path: str | os.PathLike[str]) -> int:
    try:
        os.unlink(path)
    except OSError:
        return 0
    return 1


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (best effort where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
