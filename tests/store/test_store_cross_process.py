"""A second process hits what a first process stored: through a real Redis ("another machine") and on local disk.

Process A and process B are separate Python interpreters with different working directories and different
``PYTHONHASHSEED`` values. A stores KV for a prompt (prefix chunks and chunk-mode segments); B must hit every stored
entry, produce the same tokens, and the KV it loads must be bit-identical to what A computed (and to what B computes
itself); another tenant must never hit.

* Redis: A and B also have different ``INFERCACHE_HOME`` folders; the only thing they share is the server. Skipped
  when ``redis-server`` is not installed, like the other real-Redis tests.
* Disk: both open the default folder (``disk:`` = ``$INFERCACHE_HOME/kv``) of the same ``INFERCACHE_HOME``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    from infercache import reuse, store
    from infercache.models import load
    from infercache.reuse.verify import full_prefill

    url, role = sys.argv[1], sys.argv[2]
    LONG = ("The harbour master of Port Wendel keeps a ledger of every ship that enters the bay. " * 4)
    DOCS = ["Doc A: the lighthouse is kept by Jonas Pike. ", "Doc B: the ferry leaves at seven. ",
            "Doc C: the mill grinds only barley. "]
    model, tok = load("tiny-random-llama")

    def digest(kv):
        h = hashlib.sha256()
        for k, v in kv:
            h.update(k.contiguous().numpy().tobytes())
            h.update(v.contiguous().numpy().tobytes())
        return h.hexdigest()

    prefix = reuse.generate(model, tok, [LONG, "Who keeps the ledger?"], store=url, mode="prefix", max_new_tokens=8,
                            chunk_size=64)
    chunk = reuse.generate(model, tok, [*DOCS, "Who keeps the lighthouse?"], store=url, mode="chunk",
                           max_new_tokens=8)
    prompt = torch.tensor(prefix.prompt_ids)
    kv_store = store.KVStore(store.open(url), reuse.namespace_for(model, tok), chunk_size=64)
    found = kv_store.get_kv(prompt)  # what Redis holds for this prompt, decoded and checked
    _, cache, _ = full_prefill(model, prompt)  # what this process computes itself
    own = [(layer.keys[0, :, :found.num_tokens], layer.values[0, :, :found.num_tokens]) for layer in cache.layers]
    other_tenant = reuse.generate(model, tok, [LONG, "Who keeps the ledger?"], store=url, mode="prefix",
                                  max_new_tokens=1, chunk_size=64, tenant_salt="tenant-" + role)
    kv_store.close()
    print(json.dumps({
        "role": role, "cwd": os.getcwd(), "home": os.environ["INFERCACHE_HOME"], "pid": os.getpid(),
        "namespace": kv_store.namespace.digest(),
        "prefix": {"ids": prefix.ids, "hits": prefix.report.store_hits, "misses": prefix.report.store_misses,
                   "writes": prefix.report.store_writes, "reused": prefix.report.reused_tokens,
                   "prompt_tokens": prefix.report.prompt_tokens},
        "chunk": {"ids": chunk.ids, "hits": chunk.report.store_hits, "misses": chunk.report.store_misses,
                  "writes": chunk.report.store_writes, "reused": chunk.report.reused_tokens,
                  "fresh": chunk.report.fresh_tokens},
        "stored_tokens": found.num_tokens, "stored_kv_sha256": digest(found.kv) if found.kv else None,
        "own_kv_sha256": digest(own), "own_equals_stored": bool(found.kv) and all(
            torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(found.kv, own)),
        "other_tenant_hits": other_tenant.report.store_hits,
    }))
""")


def run_child(tmp_path: Path, role: str, url: str, hash_seed: str, home: Path | None = None) -> dict:
    """Run :data:`CHILD` as its own interpreter in its own folder; INFERCACHE_HOME is ``home`` or its own."""
    folder = tmp_path / f"machine-{role}"
    folder.mkdir(parents=True)
    home = home or folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "INFERCACHE_HOME": str(home), "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", CHILD, url, role], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"process {role} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_hits_what_the_first_stored_through_redis(redis_server, tmp_path: Path) -> None:
    a = run_child(tmp_path, "a", redis_server.url, "1")
    b = run_child(tmp_path, "b", redis_server.url, "2")
    assert a["cwd"] != b["cwd"] and a["home"] != b["home"] and a["pid"] != b["pid"]
    check_second_process_hits(a, b)
    assert not any((tmp_path / f"machine-{role}" / "home" / "kv").exists() for role in "ab"), "nothing on disk"


def test_second_process_hits_what_the_first_stored_on_the_default_disk(tmp_path: Path) -> None:
    home = tmp_path / "shared-home"
    a = run_child(tmp_path, "a", "disk:", "1", home=home)
    b = run_child(tmp_path, "b", "disk:", "2", home=home)
    assert a["cwd"] != b["cwd"] and a["home"] == b["home"] and a["pid"] != b["pid"]
    check_second_process_hits(a, b)
    assert len(list((home / "kv").rglob("*.safetensors"))) >= a["prefix"]["writes"] + a["chunk"]["writes"]


def check_second_process_hits(a: dict, b: dict) -> None:
    assert a["namespace"] == b["namespace"], "same model and tokenizer must give the same namespace everywhere"

    # A started on an empty store: nothing to hit, everything written.
    assert a["prefix"]["hits"] == 0 and a["prefix"]["writes"] == a["prefix"]["misses"] >= 2
    assert a["chunk"]["hits"] == 0 and a["chunk"]["writes"] == a["chunk"]["misses"] == 3  # the three documents
    # B hits every entry A wrote and writes nothing new.
    assert b["prefix"]["hits"] == a["prefix"]["writes"] and b["prefix"]["misses"] == 0
    assert b["prefix"]["writes"] == 0 and b["prefix"]["reused"] == b["prefix"]["prompt_tokens"] - 1
    assert b["chunk"]["hits"] == 3 and b["chunk"]["writes"] == 0 and b["chunk"]["reused"] > 0
    # Same output in both processes.
    assert b["prefix"]["ids"] == a["prefix"]["ids"]
    assert b["chunk"]["ids"] == a["chunk"]["ids"]
    # The stored KV is bit-identical to what A computed and to what B computes itself.
    assert a["stored_tokens"] == b["stored_tokens"] == a["prefix"]["prompt_tokens"]
    assert a["stored_kv_sha256"] == b["stored_kv_sha256"] == a["own_kv_sha256"] == b["own_kv_sha256"]
    assert a["own_equals_stored"] and b["own_equals_stored"]
    # Another tenant (salted namespace) never sees those entries, from either process.
    assert a["other_tenant_hits"] == 0 and b["other_tenant_hits"] == 0
