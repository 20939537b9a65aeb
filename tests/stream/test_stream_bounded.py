"""Memory stays bounded by the budget however long the stream runs; positions stay inside the window."""

import pytest
import torch

import infercache.stream as stream_api
from infercache.stream.entries import TEXT, VISION

BUDGET = 96


@pytest.mark.parametrize("policy,options", [
    ("streaming_llm", {}),
    ("streaming_llm", {"sinks": 0}),  # the plain sliding window
    ("streaming_vlm", {}),
    ("rekv", {"block_size": 16, "max_blocks": 8}),
])
def test_memory_bounded_after_ten_budgets(tiny, make_ids, policy, options):
    model, tok = tiny("llama")
    ids = make_ids(10 * BUDGET + 37)
    with stream_api.open(model, tok, policy, budget=BUDGET, **options) as s:
        per_entry = None
        sizes = []
        for start in range(0, ids.numel(), 41):
            s.feed(ids=ids[start : start + 41])
            assert s.held_tokens <= BUDGET
            pos = s.positions()
            assert int(pos.max()) < BUDGET  # re-positioned: never beyond the window
            if policy != "streaming_vlm":
                assert torch.equal(pos, torch.arange(s.held_tokens))
            per_entry = per_entry or s.cache.nbytes() / s.held_tokens
            sizes.append(s.nbytes())
        s.ask("anything?", max_new_tokens=3)
        assert s.seen == ids.numel() and s.held_tokens <= BUDGET
        # held bytes are the held entries, nothing else grows (ReKV's summaries are capped by max_blocks)
        assert s.cache.nbytes() <= BUDGET * per_entry + 1
        assert max(sizes[len(sizes) // 2:]) <= max(sizes[: len(sizes) // 2]) * 1.25
        if policy == "rekv":
            stats = s.stats()
            assert stats["offloaded_blocks"] == 8 and stats["dropped_blocks"] > 0
            assert len(s.policy.archive.tier.keys()) == 8 * model.config.num_hidden_layers


def test_streaming_vlm_typed_budgets(qwen2vl, make_ids):
    model, tok = qwen2vl
    g = torch.Generator().manual_seed(0)
    options = dict(sinks=4, vision=48, text_recent=16, text_sink=8, text_window=8)
    with stream_api.open(model, tok, "streaming_vlm", budget=96, **options) as s:
        s.feed(ids=make_ids(4, 99))  # the "system prompt": sinks
        s.feed(ids=make_ids(30, 98))  # old text
        for i in range(25):
            s.feed(embeds=torch.randn(16, 64, generator=g), grid=(1, 4, 4))
            s.feed(ids=make_ids(3, i))
            assert s.held_tokens <= 96
        e = s.cache.entries
        assert e.index[:4].tolist() == [0, 1, 2, 3]
        vision = e.modality == VISION
        # the vision window holds whole frames, the newest ones
        frames = torch.unique(e.chunk[vision])
        assert all(int((e.chunk == c).sum()) == 16 for c in frames)
        assert int(frames.max()) == int(e.chunk.max()) - 1  # newest frame (the last chunk is text)
        # older text: its first tokens survive (text sink), right after the sinks
        assert e.index[4:12].tolist() == list(range(4, 12))
        assert int((e.modality == TEXT).sum()) <= 4 + 16 + 8 + 8
        assert int(e.pos.max()) < s.held_tokens
        # once pruning starts every type is cut to its own budget (room left over may take one more frame)
        kept = s.policy.keep_mask(e.modality, e.chunk)
        assert int((e.modality[kept] == VISION).sum()) <= 48
        assert int(kept.sum()) <= 4 + 48 + 16 + 8 + 8


def test_streaming_vlm_keep_mask_in_isolation():
    from infercache.stream.policies import StreamingVLM

    policy = StreamingVLM(sinks=2, vision=8, text_recent=3, text_sink=2, text_window=1)
    policy.setup(16, None)
    # sinks, 6 old text, frame A (4), 2 text, frame B (4), 2 text, frame C (4), 2 text
    mods = [TEXT] * 2 + [TEXT] * 6 + [VISION] * 4 + [TEXT] * 2 + [VISION] * 4 + [TEXT] * 2 + [VISION] * 4 + [TEXT] * 2
    chunks = [0] * 2 + [1] * 6 + [2] * 4 + [3] * 2 + [4] * 4 + [5] * 2 + [6] * 4 + [7] * 2
    keep = policy.keep_mask(torch.tensor(mods, dtype=torch.uint8), torch.tensor(chunks))
    kept = torch.nonzero(keep).flatten().tolist()
    # indices: sinks 0-1, old text 2-7, A 8-11, text 12-13, B 14-17, text 18-19, C 20-23, text 24-25
    frames_b_c = list(range(14, 18)) + list(range(20, 24))  # newest whole frames within 8 vision tokens
    recent_text = [19, 24, 25]  # newest 3 text tokens from frame B on
    older = [2, 3] + [18]  # older text: its first 2 (text sink) + its last 1 (text window)
    assert kept == sorted([0, 1] + frames_b_c + recent_text + older)


def test_m_rope_positions_bounded_under_streaming_llm(qwen2vl, make_ids):
    model, tok = qwen2vl
    g = torch.Generator().manual_seed(2)
    with stream_api.open(model, tok, "streaming_llm", budget=80) as s:
        for i in range(30):
            s.feed(embeds=torch.randn(16, 64, generator=g), grid=(1, 4, 4))
            s.feed(ids=make_ids(9, i))
            assert s.held_tokens <= 80 and int(s.positions().max()) < 80
        assert s.ask("hi", max_new_tokens=2) is not None
