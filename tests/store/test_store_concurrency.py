"""Two processes writing the same key while this one reads: every read is a miss or a whole, valid blob."""

from __future__ import annotations

import subprocess
import sys
import time

from infercache.store import open as open_store
from infercache.store.blob import decode

WRITER = r"""
import sys, time, torch
from infercache.store import open as open_store
from infercache.store.blob import BlobMeta, encode
torch.manual_seed(int(sys.argv[2]))
store = open_store("disk:" + sys.argv[1])
kv = [(torch.full((2, 512, 8), float(sys.argv[2])), torch.full((2, 512, 8), -float(sys.argv[2])))]
blob = encode(kv, BlobMeta(namespace="n" * 64, extra={"writer": int(sys.argv[2])}))
end = time.time() + float(sys.argv[3])
while time.time() < end:
    store.put("k" * 64, blob)
"""


def test_concurrent_writers_never_produce_a_torn_read(tmp_path):
    seconds = 4.0
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(i), str(seconds)]) for i in (1, 2)]
    store = open_store(f"disk:{tmp_path}")
    reads = valid = 0
    deadline = time.time() + seconds + 30  # writers need a few seconds to import torch first
    try:
        while any(w.poll() is None for w in writers) and time.time() < deadline:
            data = store.get("k" * 64)
            if data is None:
                continue
            reads += 1
            kv, _ = decode(data)  # raises CorruptBlobError on a torn or mixed write
            value = float(kv[0][0].flatten()[0])
            assert value in (1.0, 2.0)
            assert bool((kv[0][0] == value).all()) and bool((kv[0][1] == -value).all())  # one writer's blob, whole
            valid += 1
    finally:
        for w in writers:
            w.wait(timeout=60)
    assert all(w.returncode == 0 for w in writers)
    assert reads > 0 and valid == reads
    assert not list(tmp_path.rglob(".tmp-*"))  # no temp file left behind
