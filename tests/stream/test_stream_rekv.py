"""ReKV: offloaded blocks round-trip through the store, retrieval finds planted blocks per layer, merging is exact
for duplicates."""

import torch
import torch.nn.functional as F

import infercache.stream as stream_api
from infercache.store import MemoryStore
from infercache.stream.attention import stream_mask
from infercache.stream.merge import merge_block, merge_groups
from infercache.stream.offload import BlockArchive


def _block(g, layers=3, heads=2, n=8, dim=16):
    return [(torch.randn(heads, n, dim, generator=g), torch.randn(heads, n, dim, generator=g)) for _ in range(layers)]


def test_archive_round_trip_and_planted_retrieval_per_layer(tiny, tmp_path):
    model, _ = tiny("llama")  # 3 layers, 2 KV heads, head_dim 16, 4 query heads
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    direction = direction / direction.norm()
    planted = {0: 7, 1: 13, 2: 2}  # each layer has its own relevant block
    archive = BlockArchive(model, store=f"memory://?max_bytes=64KiB,disk:{tmp_path}?fsync=false", max_blocks=None)
    blocks = []
    for b in range(20):
        kv = _block(g)
        for layer, target in planted.items():
            if b == target:
                kv[layer] = (kv[layer][0] + 8 * direction, kv[layer][1])  # the block's mean key points at the query
        summary = torch.stack([k.mean(1) for k, _ in kv])
        archive.put(kv, start=100 + 8 * b, rel_pos=torch.arange(8), summary=summary)
        blocks.append(kv)
    query = direction.expand(4, 16)  # 4 query heads, all asking for `direction`
    for layer, target in planted.items():
        assert archive.top_k(layer, query, 1) == [target]
        top3 = archive.top_k(layer, query, 3)
        assert target in top3 and top3 == sorted(top3)  # stream order
    # round trip: bit-exact, from the disk tier too (64 KiB of RAM holds a few blocks only)
    assert archive.tier.tiers[1].nbytes() > 0
    for slot in (0, 7, 19):
        for layer in range(3):
            k, v, pos, counts = archive.load(slot, layer)
            assert torch.equal(k, blocks[slot][layer][0]) and torch.equal(v, blocks[slot][layer][1])
            assert torch.equal(pos, torch.arange(8)) and counts is None
    archive.close()


def test_archive_bounds_summaries_and_store(tiny):
    model, _ = tiny("llama")
    g = torch.Generator().manual_seed(1)
    tier = MemoryStore()
    archive = BlockArchive(model, store=tier, max_blocks=4)
    for b in range(10):
        kv = _block(g)
        archive.put(kv, start=8 * b, rel_pos=torch.arange(8), summary=torch.stack([k.mean(1) for k, _ in kv]))
    assert len(archive.blocks) == 4 and archive.dropped == 6
    assert [info.start for info in archive.blocks] == [48, 56, 64, 72]
    assert len(tier.keys()) == 4 * 3
    assert archive.nbytes() == 4 * 3 * 2 * 16 * 4


def test_lost_block_is_a_miss(tiny):
    model, _ = tiny("llama")
    g = torch.Generator().manual_seed(2)
    archive = BlockArchive(model, store=MemoryStore(), max_blocks=None)
    kv = _block(g)
    archive.put(kv, start=0, rel_pos=torch.arange(8), summary=torch.stack([k.mean(1) for k, _ in kv]))
    archive.tier.delete(archive.key(0, 1))
    assert archive.load(0, 1) is None and archive.load(0, 0) is not None


def test_rekv_stream_retrieves_per_layer_and_releases(tiny, make_ids):
    model, tok = tiny("llama")
    ids = make_ids(900)
    with stream_api.open(model, tok, "rekv", budget=128, block_size=16, topk=3, store="memory://") as s:
        s.feed(ids=ids)
        stats = s.stats()
        assert stats["offloaded_blocks"] == (900 - s.held_tokens) // 16
        held, before = s.held_tokens, s.cache.entries.index.clone()
        seen_lengths = []
        layer = s.cache.layers[1]
        original = layer.attention_inputs

        def spy(query, keys, values):
            out = original(query, keys, values)
            seen_lengths.append(out[0].shape[2])
            return out

        layer.attention_inputs = spy
        s.ask("where?", max_new_tokens=3)
        fetched = s.policy.last_fetched
        assert set(fetched) == {0, 1, 2} and all(len(v) == 3 for v in fetched.values())
        # the question attends over sinks + 3 retrieved blocks + window + itself
        q = len(tok(stream_api.DEFAULT_TEMPLATE.format(question="where?"), add_special_tokens=False)["input_ids"])
        assert seen_lengths[0] == held + 3 * 16 + q
        assert s.held_tokens == held and torch.equal(s.cache.entries.index, before)  # released
        assert all(lay.retrieved is None for lay in s.cache.layers) and s.cache.retrieval is None


def test_merging_exact_duplicates_is_lossless():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 6, 8, generator=g)
    values = torch.randn(2, 6, 8, generator=g)
    keys[:, 3], values[:, 3] = keys[:, 1], values[:, 1]  # token 3 duplicates token 1
    keys[:, 5], values[:, 5] = keys[:, 1], values[:, 1]  # token 5 too
    mergeable = torch.tensor([False, True, True, True, True, True])
    groups = merge_groups(keys, mergeable, threshold=0.999)
    assert groups.tolist() == [0, 1, 2, 1, 3, 1]
    (mk, mv), counts, first = merge_block([(keys, values)], groups)[0][0], *merge_block([(keys, values)], groups)[1:]
    assert counts.tolist() == [1, 3, 1, 1] and first.tolist() == [0, 1, 2, 4]
    query = torch.randn(1, 2, 1, 8, generator=g)
    full = F.scaled_dot_product_attention(query, keys[None], values[None])
    mask = stream_mask(1, 4, None, counts.float().log(), torch.float32, "cpu")
    merged = F.scaled_dot_product_attention(query, mk[None], mv[None], attn_mask=mask)
    torch.testing.assert_close(merged, full, atol=1e-6, rtol=1e-6)


def test_merge_frames_in_a_stream(tiny, make_ids):
    model, tok = tiny("llama")
    frame = model.get_input_embeddings().weight[10:26].detach().clone()  # a static scene: the same frame again
    # merging happens inside a block: blocks of 40 entries span two frames, so the repeated frame merges
    with stream_api.open(model, tok, "rekv", budget=96, block_size=40, topk=2, merge_frames=True,
                         store="memory://") as s:
        for i in range(12):
            s.feed(embeds=frame, modality="vision")
            s.feed(ids=make_ids(4, i))
        stats = s.stats()
        assert stats["offloaded_blocks"] >= 3 and stats["merged_tokens"] >= 3 * 16
        stored = sum(info.entries for info in s.policy.archive.blocks)
        assert stored + stats["merged_tokens"] == sum(info.tokens for info in s.policy.archive.blocks)
        assert s.ask("what moved?", max_new_tokens=2) is not None


def test_rekv_retrieves_the_block_that_holds_a_planted_fact(one_layer, make_ids):
    """End to end in a stream: two "facts" (32 copies of one token, each exactly one offloaded block) are planted in
    random text; a question made of a fact's token retrieves that fact's block first. The model is the one-layer
    tiny llama with its query projection tied to its key projection, so the question's mean pre-RoPE query equals
    the fact block's mean pre-RoPE key (its summary) and relevance is a real property of the weights."""
    import copy

    base, tok = one_layer("llama")
    model = copy.deepcopy(base)
    attn = model.model.layers[0].self_attn
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    k_w = attn.k_proj.weight.detach().view(model.config.num_key_value_heads, -1, attn.k_proj.weight.shape[-1])
    attn.q_proj.weight.data.copy_(k_w.repeat_interleave(group, dim=0).reshape_as(attn.q_proj.weight))
    x, y = tok("Z", add_special_tokens=False)["input_ids"][0], tok("Q", add_special_tokens=False)["input_ids"][0]
    ids = make_ids(1200, seed=7)
    ids = ids[(ids != x) & (ids != y)][:1100]
    sinks, block = 4, 32
    at = {x: sinks + 5 * block, y: sinks + 20 * block}  # block-aligned: blocks leave the window at 4 + 32 k
    for token, start in at.items():
        ids[start : start + block] = token
    with stream_api.open(model, tok, "rekv", budget=128, block_size=block, topk=2, store="memory://") as s:
        s.feed(ids=ids)
        starts = [info.start for info in s.policy.archive.blocks]
        assert at[x] in starts and at[y] in starts  # both facts were offloaded, each as one block
        for token, char in ((x, "Z"), (y, "Q")):
            s.ask(char * 12, max_new_tokens=1, template="{question}")
            fetched = s.policy.last_fetched[0]
            assert at[token] in fetched, (char, fetched)
            # and it is the best block, not just one of the top 2
            with torch.no_grad():
                q = attn.q_proj(model.model.layers[0].input_layernorm(model.model.embed_tokens.weight[token]))
            top1 = s.policy.archive.top_k(0, q.view(model.config.num_attention_heads, -1), 1)
            assert s.policy.archive.blocks[top1[0]].start == at[token]
