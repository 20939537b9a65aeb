"""Content-addressed keys: stability, chaining, partial chunks, segments, validation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from infercache.store import Namespace, chunk_keys, segment_keys
from infercache.store.keys import canonical_json

GOLDEN = dict(model_id="golden/model", weights_hash="abc", dtype="bfloat16", num_layers=2, num_kv_heads=1,
              head_dim=4, rope={"rope_theta": 10000.0, "rope_type": "default"}, tokenizer_hash="tok")
# Pinned values: if these change, stored KV silently stops hitting. Bump KEY_FORMAT_VERSION on purpose instead.
GOLDEN_DIGEST = "3d9a90765fffda4411641bb3fe64bf203ceffea5e563d4b7d03595113171bf9f"
GOLDEN_CHUNKS = ["ed10acbbb5b688079071b94681c2f5730855f07d01078b22d6ded7268953d2fb",
                 "9ab70a9609ba672578882c4a64561fe13f51d759aa7ff6f31a7d392b10b02803",
                 "12707932c4dd9229fc074d9855a1d004d840a0ee93923c0035a1ed0ad82976b2"]


def test_keys_are_pinned() -> None:
    namespace = Namespace(**GOLDEN)
    assert namespace.digest() == GOLDEN_DIGEST
    assert [c.key for c in chunk_keys(list(range(10)), namespace, 4)] == GOLDEN_CHUNKS


def test_chunk_keys_follow_the_documented_formula() -> None:
    namespace = Namespace(**GOLDEN)
    ns = hashlib.sha256(b"infercache/namespace\x00" + canonical_json(namespace.as_dict()).encode()).digest()
    assert ns.hex() == namespace.digest()
    tokens = list(range(10))
    previous, expected = ns, []
    for start in range(0, 10, 4):
        chunk = tokens[start:start + 4]
        previous = hashlib.sha256(b"infercache/prefix-chunk\x00" + previous + len(chunk).to_bytes(4, "little")
                                  + np.asarray(chunk, "<u4").tobytes() + ns).digest()
        expected.append(previous.hex())
    assert [c.key for c in chunk_keys(tokens, namespace, 4)] == expected


def test_keys_are_identical_in_another_process() -> None:
    script = textwrap.dedent(f"""
        import json
        from infercache.store import Namespace, chunk_keys, segment_keys
        ns = Namespace(**{GOLDEN!r})
        print(json.dumps([ns.digest(), [c.key for c in chunk_keys(list(range(10)), ns, 4)],
                          [s.key for s in segment_keys([[5, 6], [7]], ns)], hash("salted")]))
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            check=True)
    digest, chunks, segments, their_hash = json.loads(result.stdout)
    namespace = Namespace(**GOLDEN)
    assert digest == namespace.digest()
    assert chunks == [c.key for c in chunk_keys(list(range(10)), namespace, 4)]
    assert segments == [s.key for s in segment_keys([[5, 6], [7]], namespace)]
    if os.environ.get("PYTHONHASHSEED") != "12345":
        assert their_hash != hash("salted"), "sanity: the other process really had a different hash seed"


@pytest.mark.parametrize("change", [
    {"model_id": "other"}, {"weights_hash": "def"}, {"dtype": "float16"}, {"num_layers": 3}, {"num_kv_heads": 2},
    {"head_dim": 8}, {"rope": {"rope_theta": 500000.0, "rope_type": "default"}}, {"tokenizer_hash": "x"},
    {"format_version": 2}, {"tenant_salt": "tenant-a"},
])
def test_every_namespace_field_changes_the_digest(change: dict) -> None:
    base = Namespace(**GOLDEN)
    assert dataclasses.replace(base, **change).digest() != base.digest()


def test_rope_dict_is_canonical() -> None:
    a = Namespace(**{**GOLDEN, "rope": {"rope_type": "default", "rope_theta": 10000}})
    b = Namespace(**{**GOLDEN, "rope": {"rope_theta": 10000.0, "rope_type": "default"}})
    assert a.digest() == b.digest() and a == b and hash(a) == hash(b)


def test_tenant_salt_isolates_every_chunk() -> None:
    plain = Namespace(**GOLDEN)
    salted = Namespace(**GOLDEN, tenant_salt="tenant-a")
    tokens = list(range(20))
    assert not {c.key for c in chunk_keys(tokens, plain, 4)} & {c.key for c in chunk_keys(tokens, salted, 4)}


def test_chained_keys_commit_to_earlier_chunks(namespace: Namespace) -> None:
    tokens = list(range(100, 120))
    base = chunk_keys(tokens, namespace, 4)
    early = chunk_keys([999] + tokens[1:], namespace, 4)
    assert all(a.key != b.key for a, b in zip(base, early)), "a change in chunk 0 must change every later key"
    late = chunk_keys(tokens[:9] + [999] + tokens[10:], namespace, 4)  # token 9 is in chunk 2
    assert [a.key == b.key for a, b in zip(base, late)] == [True, True, False, False, False]


def test_same_chunk_content_at_another_offset_gets_another_prefix_key(namespace: Namespace) -> None:
    keys = chunk_keys([1, 2, 3, 4, 1, 2, 3, 4], namespace, 4)
    assert keys[0].key != keys[1].key


def test_partial_tail_kept_by_default_and_flagged(namespace: Namespace) -> None:
    keys = chunk_keys(list(range(10)), namespace, 4)
    assert [(c.start, c.end, c.partial) for c in keys] == [(0, 4, False), (4, 8, False), (8, 10, True)]
    assert keys[-1].num_tokens == 2
    longer = chunk_keys(list(range(12)), namespace, 4)
    assert longer[2].key != keys[2].key and not longer[2].partial
    assert [c.key for c in longer[:2]] == [c.key for c in keys[:2]]


def test_partial_tail_dropped_on_request(namespace: Namespace) -> None:
    assert [c.end for c in chunk_keys(list(range(10)), namespace, 4, partial="drop")] == [4, 8]
    assert chunk_keys([1, 2, 3], namespace, 4, partial="drop") == []
    short = chunk_keys([1, 2, 3], namespace, 4)
    assert len(short) == 1 and short[0].partial


def test_token_containers_agree(namespace: Namespace) -> None:
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = [c.key for c in chunk_keys(tokens, namespace, 3)]
    for variant in (tuple(tokens), np.array(tokens, dtype=np.int64), torch.tensor(tokens),
                    np.array(tokens, dtype=np.uint32)):
        assert [c.key for c in chunk_keys(variant, namespace, 3)] == expected


@pytest.mark.parametrize("tokens, chunk_size, error, match", [
    ([], 4, ValueError, "empty"),
    ([1, 2], 0, ValueError, "chunk_size"),
    ([1, 2], -3, ValueError, "chunk_size"),
    ([1, 2], 2.0, ValueError, "chunk_size"),
    ([1, 2], True, ValueError, "chunk_size"),
    ([1, -2], 4, ValueError, r"\[0, 2\*\*32\)"),
    ([1, 2**32], 4, ValueError, r"\[0, 2\*\*32\)"),
    ([[1, 2]], 4, ValueError, "1-D"),
    ([1.5, 2.0], 4, TypeError, "integers"),
])
def test_chunk_keys_validate_inputs(namespace: Namespace, tokens, chunk_size, error, match) -> None:
    with pytest.raises(error, match=match):
        chunk_keys(tokens, namespace, chunk_size)


def test_chunk_keys_reject_unknown_partial_policy(namespace: Namespace) -> None:
    with pytest.raises(ValueError, match="partial"):
        chunk_keys([1, 2], namespace, 4, partial="pad")  # type: ignore[arg-type]


def test_segment_keys_are_position_independent(namespace: Namespace) -> None:
    doc_a, doc_b, doc_c = [10, 11, 12], [20, 21], [30, 31, 32, 33]
    first = segment_keys([doc_a, doc_b, doc_c], namespace)
    second = segment_keys([doc_c, doc_a], namespace)
    assert first[0].key == second[1].key and first[2].key == second[0].key
    assert (first[1].start, first[1].end) == (3, 5) and (second[1].start, second[1].end) == (4, 7)
    assert first[0].chain_key is None
    assert first[0].key not in {c.key for c in chunk_keys(doc_a, namespace, 3)}, "families must not collide"


def test_segment_chain_keys_depend_on_what_came_before(namespace: Namespace) -> None:
    one = segment_keys([[1, 2], [3, 4], [5]], namespace, chained=True)
    two = segment_keys([[9, 9], [3, 4], [5]], namespace, chained=True)
    assert one[1].key == two[1].key and one[1].chain_key != two[1].chain_key
    assert one[2].chain_key != two[2].chain_key
    assert len({s.chain_key for s in one}) == 3


def test_segment_keys_validate_inputs(namespace: Namespace) -> None:
    with pytest.raises(ValueError, match="segments is empty"):
        segment_keys([], namespace)
    with pytest.raises(ValueError, match=r"segments\[1\] is empty"):
        segment_keys([[1], []], namespace)
    with pytest.raises(TypeError, match="string"):
        segment_keys("abc", namespace)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Namespace"):
        chunk_keys([1], "not-a-namespace", 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, match", [
    ({"num_layers": 0}, "num_layers"), ({"head_dim": -1}, "head_dim"), ({"model_id": ""}, "model_id"),
    ({"rope": {"theta": float("nan")}}, "non-finite"), ({"rope": {"theta": object()}}, "JSON"),
    ({"rope": {1: 2}}, "keys must be str"),
])
def test_namespace_validates_fields(bad: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        Namespace(**{**GOLDEN, **bad})


def test_namespace_from_hf_config() -> None:
    class Config:  # the attributes a transformers LlamaConfig carries
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = 4, 8, 2, 64
        rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        max_position_embeddings = 2048

    ns = Namespace.from_config(Config(), model_id="m", weights_hash="w", dtype="float32")
    assert (ns.num_layers, ns.num_kv_heads, ns.head_dim) == (4, 2, 8)
    assert ns.rope["rope_parameters"]["rope_theta"] == 10000
