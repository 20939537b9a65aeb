"""mode="prefix": exact reuse, store hits, failure handling (corrupt blob, Redis down) and cross-process hits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import fakeredis
import pytest
import torch
from transformers import DynamicCache

from infercache import reuse, store
from infercache.reuse import namespace_for

LONG = "The history of the harbour town is long and full of storms, trade and feuds. " * 4  # ~330 byte tokens


def full(model, tok, segments, n=12):
    return reuse.generate(model, tok, segments, mode="full", max_new_tokens=n)


def test_second_request_hits_and_is_identical(llama, memory_store) -> None:
    model, tok = llama
    segments = [LONG, "Question one?"]
    first = reuse.generate(model, tok, segments, store=memory_store, mode="prefix", max_new_tokens=12,
                           chunk_size=64)
    n = first.report.prompt_tokens
    assert (first.report.reused_tokens, first.report.fresh_tokens, first.report.store_hits) == (0, n, 0)
    assert first.report.store_writes == first.report.store_misses == -(-n // 64)
    second = reuse.generate(model, tok, segments, store=memory_store, mode="prefix", max_new_tokens=12,
                            chunk_size=64, verify=True)
    rep = second.report
    assert rep.store_hits == first.report.store_writes and rep.store_misses == 0 and rep.store_writes == 0
    assert (rep.reused_tokens, rep.fresh_tokens) == (n - 1, 1), "an exact repeat still prefills its last token"
    assert second.ids == first.ids == full(model, tok, segments).ids
    assert rep.verify.greedy_identical and rep.verify.top1_agreement == 1.0
    # stored prefix + prefill of the rest vs one-shot prefill: equal up to low bits of float32
    assert rep.verify.max_abs_logit_diff < 1e-5 and rep.verify.kl_first < 1e-10


def test_shared_prefix_new_question_prefills_only_the_tail(llama, memory_store) -> None:
    model, tok = llama
    reuse.generate(model, tok, [LONG, "Question one?"], store=memory_store, mode="prefix", max_new_tokens=2,
                   chunk_size=64)
    other = [LONG, "A different, longer question about the storms?"]
    out = reuse.generate(model, tok, other, store=memory_store, mode="prefix", max_new_tokens=12, chunk_size=64,
                         verify=True)
    prefix_chunks = len(tok(LONG).input_ids) // 64
    assert out.report.reused_tokens == 64 * prefix_chunks and out.report.store_hits == prefix_chunks
    assert out.report.fresh_tokens == out.report.prompt_tokens - 64 * prefix_chunks
    assert out.ids == full(model, tok, other).ids and out.report.verify.max_abs_logit_diff < 1e-5


def test_reuse_continues_the_stored_request_bit_for_bit(llama, memory_store) -> None:
    """What is exact: the reused KV is bit-identical to the first request's, so the result equals continuing that
    request's transformers cache. Against a one-shot prefill of the new prompt only low bits can differ (other
    matrix shapes): checked above with max |dlogit| < 1e-5."""
    from infercache.reuse.prefix import prefix_prompt
    from infercache.store import KVStore

    model, tok = llama
    first_ids = torch.tensor(full(model, tok, [LONG, "Question one?"], n=1).prompt_ids)
    reuse.generate(model, tok, [LONG, "Question one?"], store=memory_store, mode="prefix", max_new_tokens=1,
                   chunk_size=64)
    ids = torch.tensor(full(model, tok, [LONG, "Other?"], n=1).prompt_ids)
    state = prefix_prompt(model, ids, KVStore(memory_store, namespace_for(model, tok), chunk_size=64))
    hit = state.reused
    assert hit == 64 * (len(tok(LONG).input_ids) // 64)
    original = DynamicCache()
    with torch.no_grad():
        model(first_ids[None], cache=original)
        kept = DynamicCache(ddp_cache_data=[(lk.keys[:, :, :hit], lk.values[:, :, :hit]) for lk in original.layers])
        continued = model(ids[None, hit:], cache=kept, logits_to_keep=1).logits[0, -1]
    assert torch.equal(state.logits, continued)


def test_corrupt_blob_is_a_miss_with_correct_output(llama, memory_store) -> None:
    model, tok = llama
    segments = [LONG, "Question one?"]
    reuse.generate(model, tok, segments, store=memory_store, mode="prefix", max_new_tokens=2, chunk_size=64)
    kv_store = store.KVStore(memory_store, namespace_for(model, tok), chunk_size=64)
    keys = kv_store.chunk_keys(torch.tensor(reuse.generate(model, tok, segments, mode="full",
                                                           max_new_tokens=1).prompt_ids))
    blob = bytearray(memory_store.get(keys[1].key))
    blob[len(blob) // 2] ^= 0xFF
    memory_store.put(keys[1].key, bytes(blob))
    out = reuse.generate(model, tok, segments, store=memory_store, mode="prefix", max_new_tokens=12, chunk_size=64)
    assert out.report.corrupt == 1 and out.report.store_hits == 1 and out.report.reused_tokens == 64
    assert out.ids == full(model, tok, segments).ids
    assert memory_store.contains(keys[1].key), "the bad entry was deleted and written again"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_redis_down_is_a_miss_with_correct_output(llama) -> None:
    model, tok = llama
    segments = [LONG, "Question one?"]
    url = f"redis://127.0.0.1:{_closed_port()}/0?connect_timeout=0.2&timeout=0.2"
    for _ in range(2):
        out = reuse.generate(model, tok, segments, store=url, mode="prefix", max_new_tokens=12, chunk_size=64)
        assert out.report.store_hits == 0 and out.report.store_writes == 0 and out.report.reused_tokens == 0
        assert out.ids == full(model, tok, segments).ids


def test_redis_tier_hits(llama) -> None:
    model, tok = llama
    tier = store.RedisStore("redis://fake:6379/0", client=fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    segments = [LONG, "Question one?"]
    reuse.generate(model, tok, segments, store=tier, mode="prefix", max_new_tokens=2, chunk_size=64)
    out = reuse.generate(model, tok, segments, store=tier, mode="prefix", max_new_tokens=12, chunk_size=64)
    assert out.report.fresh_tokens == 1 and out.ids == full(model, tok, segments).ids


def test_gemma3_prefix_reuse_keeps_sliding_layers_whole(tiny, memory_store) -> None:
    model, tok = tiny("gemma3")  # sliding window 32 < prompt length
    segments = [LONG, "Question one?"]
    reuse.generate(model, tok, segments, store=memory_store, mode="prefix", max_new_tokens=2, chunk_size=64)
    out = reuse.generate(model, tok, [LONG, "Question two?"], store=memory_store, mode="prefix",
                         max_new_tokens=12, chunk_size=64, verify=True)
    assert out.report.reused_tokens >= 256 and out.report.verify.greedy_identical
    assert out.report.verify.max_abs_logit_diff < 1e-5


def test_store_arguments(llama, memory_store, tmp_path) -> None:
    model, tok = llama
    out = reuse.generate(model, tok, [LONG, "Q?"], store=None, mode="prefix", max_new_tokens=3)
    assert out.report.store_hits == out.report.store_misses == 0 and len(out.ids) == 3
    url = f"disk:{tmp_path / 'kv'}"
    reuse.generate(model, tok, [LONG, "Q?"], store=url, mode="prefix", max_new_tokens=1)
    assert reuse.generate(model, tok, [LONG, "Q?"], store=url, mode="prefix", max_new_tokens=1).report.store_hits
    wrong = store.KVStore(memory_store, store.Namespace(model_id="x", weights_hash="", dtype="float32", num_layers=3,
                                                        num_kv_heads=2, head_dim=16))
    with pytest.raises(ValueError, match="namespace"):
        reuse.generate(model, tok, ["a", "b"], store=wrong, mode="prefix")
    with pytest.raises(ValueError, match="mode must be one of"):
        reuse.generate(model, tok, ["a", "b"], store=memory_store, mode="blend")
    with pytest.raises(TypeError, match="store must be"):
        reuse.generate(model, tok, ["a", "b"], store=42, mode="prefix")


_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from infercache import reuse
    from infercache.models import load
    model, tok = load("tiny-random-llama")
    out = reuse.generate(model, tok, [sys.argv[2], "Question?"], store="disk:" + sys.argv[1], mode="prefix",
                         max_new_tokens=8, chunk_size=64)
    print(json.dumps({"ids": out.ids, "hits": out.report.store_hits, "reused": out.report.reused_tokens,
                      "writes": out.report.store_writes}))
""")


def test_cross_process_disk_hit(llama, tmp_path: Path) -> None:
    """Written by another interpreter (PYTHONHASHSEED=1), hit by this one: keys are SHA-256, never hash().

    One child only: importing infercache costs 5-15 s on the shared test machine."""
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "kv"), LONG], env=env, check=True,
                          capture_output=True, text=True, timeout=120)
    writer = json.loads(done.stdout.strip().splitlines()[-1])
    assert writer["hits"] == 0 and writer["writes"] > 0
    model, tok = llama
    reader = reuse.generate(model, tok, [LONG, "Question?"], store=f"disk:{tmp_path / 'kv'}", mode="prefix",
                            max_new_tokens=8, chunk_size=64)
    assert reader.report.store_hits == writer["writes"] and reader.report.reused_tokens > 0
    assert reader.ids == writer["ids"]
