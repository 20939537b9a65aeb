"""A 50K-token stream on a tiny model: the bytes held never exceed the budget's bytes, after any forward, and stay
flat as the stream grows (ReKV: the resident part; its offloaded store grows, up to ``max_blocks``)."""

import pytest

import infercache.stream as stream_api

TOKENS = 50_000
BUDGET = 512
#: bytes of metadata per held entry: stream index (int64), 1-D position (int64), modality (uint8), chunk (int64)
META_PER_ENTRY = 8 + 8 + 1 + 8


def kv_bytes_per_entry(model) -> int:
    """Keys + values of one entry in every layer, from the config (not from the cache under test)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * itemsize


@pytest.mark.parametrize("policy,options", [
    ("streaming_llm", {}),
    ("streaming_llm", {"sinks": 0}),  # the plain sliding window
    ("streaming_vlm", {}),
    ("rekv", {"store": "memory://"}),  # default blocks of 32, max_blocks 1024 (50K tokens: ~1,550 blocks offloaded)
])
def test_memory_under_budget_over_a_50k_token_stream(tiny, make_ids, policy, options):
    model, tok = tiny("llama")
    ids = make_ids(TOKENS, seed=5)
    budget_bytes = BUDGET * (kv_bytes_per_entry(model) + META_PER_ENTRY)
    resident, total, held = [], [], []
    with stream_api.open(model, tok, policy, budget=BUDGET, chunk_size=254, **options) as s:
        forward = s._forward

        def record(*args, **kwargs):  # after every forward of the stream, not only between feeds
            forward(*args, **kwargs)
            resident.append(s.cache.nbytes())
            total.append(s.nbytes())
            held.append(s.held_tokens)

        s._forward = record
        store_sizes = []
        for start in range(0, TOKENS, 4096):  # large feeds; the stream splits them into forwards of <= 254
            s.feed(ids=ids[start : start + 4096])
            if policy == "rekv":
                store_sizes.append(s.stats()["store_bytes"])
        assert s.seen == TOKENS
        n_forwards = len(resident)
        assert n_forwards >= TOKENS // 254
        assert max(held) <= BUDGET and max(resident) <= budget_bytes
        # flat: once the cache is full, the second half of the stream holds no more than the first half did
        half = n_forwards // 2
        assert max(resident[half:]) <= max(resident[:half])
        assert max(total[half:]) <= max(total[:half]) or policy == "rekv"
        if policy == "streaming_llm":  # sinks + window: exactly the budget once full, every forward
            first_full = held.index(BUDGET)
            assert first_full < n_forwards // 10 and set(held[first_full:]) == {BUDGET}
            assert len(set(resident[first_full:])) == 1
        if policy == "rekv":
            stats = s.stats()
            c = model.config
            summary_bytes = c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # float32 per block
            assert stats["offloaded_blocks"] == 1024 and stats["dropped_blocks"] > 0
            # RAM beyond the resident KV: the block summaries, capped by max_blocks
            assert max(total) <= budget_bytes + 1024 * summary_bytes
            assert total[-1] - resident[-1] == 1024 * summary_bytes
            # the offloaded store grew (then stopped at max_blocks), the resident part did not
            assert store_sizes[-1] >= 1024 * 32 * kv_bytes_per_entry(model)
            assert store_sizes[len(store_sizes) // 4] < store_sizes[-1]
        # a question adds transient entries and gives them back
        s.ask("anything?", max_new_tokens=4)
        assert s.cache.nbytes() <= budget_bytes and s.held_tokens <= BUDGET
        assert int(s.positions().max()) < BUDGET


def test_budget_bytes_formula_matches_a_full_cache(tiny, make_ids):
    """The bound above is the real size of a full cache (so the test cannot pass with a loose bound)."""
    model, tok = tiny("llama")
    with stream_api.open(model, tok, "streaming_llm", budget=64) as s:
        s.feed(ids=make_ids(200))
        assert s.held_tokens == 64
        assert s.nbytes() == 64 * (kv_bytes_per_entry(model) + META_PER_ENTRY)
