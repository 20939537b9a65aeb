"""Autoregressive video KV cache mechanics (untrained tiny causal video DiT) and the moving-digits clips."""

import pytest
import torch

from infercache.diffusion.video import (
    ARCacheConfig,
    ARVideoKVCache,
    CausalVideoDiT,
    generate_video,
    max_cache_tokens,
    moving_digits,
    rope,
)

torch.set_num_threads(1)
BOUNDED = ARCacheConfig(sink_frames=2, recent_frames=4, mid_capacity=2, mid_pool=2)


@pytest.fixture(scope="module")
def video_model():
    torch.manual_seed(0)
    return CausalVideoDiT(frame_size=16, patch_size=2, dim=64, depth=2, heads=4).eval()


def clips(seed=0, frames=6):
    return torch.randn(2, 1, frames, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_cache_equals_full_causal_forward(video_model):
    # Ca2-VDM's property: with causal chunks, the K/V written once per chunk equal what a full pass computes.
    x = clips()
    cache = ARVideoKVCache(2, ARCacheConfig.unbounded("absolute"))
    video_model(x[:, :, 0:2], 0.0, cache, commit=True)
    video_model(x[:, :, 2:4], 0.0, cache, commit=True)
    for t in (900.0, 400.0):  # two denoising steps of chunk 3 share the cache
        cached = video_model(x[:, :, 4:6], t, cache)
        full = video_model.forward_full(x, [0.0, 0.0, t], chunk_frames=2)[:, :, 4:6]
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # the unbounded cache with rebased positions is the same cache (nothing evicted, positions start at 0)
    rebased = ARVideoKVCache(2, ARCacheConfig.unbounded("rebased"))
    video_model(x[:, :, 0:2], 0.0, rebased, commit=True)
    video_model(x[:, :, 2:4], 0.0, rebased, commit=True)
    torch.testing.assert_close(video_model(x[:, :, 4:6], 400.0, rebased), cached, atol=1e-6, rtol=1e-6)


def test_rope_is_relative():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    qp, kp = torch.arange(5.0) + 7, torch.arange(7.0)
    scores = rope(q, qp) @ rope(k, kp).transpose(-1, -2)
    shifted = rope(q, qp + 123) @ rope(k, kp + 123).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_denoising_reads_never_write(video_model):
    seen = []
    video, cache = generate_video(
        video_model, num_chunks=5, chunk_frames=2, num_steps=3, batch_size=1, cache_config=BOUNDED,
        generator=torch.Generator().manual_seed(0), on_chunk=lambda j, c: seen.append(c.summary()),
    )  # fmt: skip
    assert video.shape == (1, 1, 10, 16, 16) and torch.isfinite(video).all()
    assert cache.commits == 5 and cache.num_frames == 10  # one write per chunk, not per denoising step
    before = cache.summary()
    keys = [s.k.clone() for s in cache.layers[0].recent]
    video_model(torch.randn(1, 1, 2, 16, 16), 500.0, cache)  # a denoising forward: read-only
    assert cache.summary() == before and all(torch.equal(a, s.k) for a, s in zip(keys, cache.layers[0].recent))
    with pytest.raises(RuntimeError, match="outside a commit"):
        cache.write(0, keys[0], keys[0], (8, 8))
    assert [s["commits"] for s in seen] == [1, 2, 3, 4, 5]


@torch.no_grad()
def test_partitions_stay_bounded(video_model):
    sizes = []
    sink_keys = {}

    def check(j, cache):
        lc = cache.layers[1]
        if j == 0:
            sink_keys["k"] = lc.sink[0].k.clone()
        assert lc.frames("sink") == 2 and torch.equal(lc.sink[0].k, sink_keys["k"])  # immutable after fill
        assert lc.frames("recent") <= 4 and len(lc.mid) <= 2
        assert all(s.compressed and s.grid == (4, 4) for s in lc.mid)  # 8x8 tokens pooled 2x2
        assert lc.tokens("mid") == 16 * sum(s.num_frames for s in lc.mid)
        sizes.append(cache.memory_bytes())

    generate_video(video_model, 9, 2, 2, cache_config=BOUNDED, generator=torch.Generator().manual_seed(2), on_chunk=check)
    per_layer = max_cache_tokens(BOUNDED, tokens_per_frame=64, chunk_frames=2)
    assert per_layer == (2 + 4) * 64 + 2 * 2 * 64 // 4
    assert sizes[-1] == sizes[5] and max(sizes) <= 2 * 2 * per_layer * 64 * 4  # layers * (k, v) * tokens * dim * fp32
    lc = generate_video(video_model, 9, 2, 2, cache_config=BOUNDED, generator=torch.Generator().manual_seed(2))[1]
    frames = [int(s.frames[0]) for s in lc.layers[0].mid]
    assert frames == [10, 12]  # the oldest evicted segments were dropped (sink 0-1, recent 14-17)


def test_rebased_positions_are_bounded_and_gap_free():
    cfg = ARCacheConfig(sink_frames=1, recent_frames=2, mid_capacity=1, mid_pool=1, positions="rebased")
    cache = ARVideoKVCache(1, cfg)
    absolute = ARVideoKVCache(1, ARCacheConfig(**{**cfg.__dict__, "positions": "absolute"}))
    q = torch.randn(1, 2, 4, 8)
    for _ in range(10):  # commit 10 chunks of 2 frames (grid 1x2: 2 tokens per frame)
        for c in (cache, absolute):
            c.begin_commit(2)
            c.write(0, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), (1, 2))
            c.end_commit()
    _, _, kpos, qpos = cache.context(0, q, 2)
    assert sorted(set(kpos.tolist())) == list(range(5))  # sink 1 + mid 2 + recent 2 frames, numbered 0..4
    assert qpos.tolist() == [5.0, 6.0]
    _, _, akpos, aqpos = absolute.context(0, q, 2)
    assert sorted(set(akpos.tolist())) == [0, 16, 17, 18, 19] and aqpos.tolist() == [20.0, 21.0]


def test_mid_topk_selects_by_affinity():
    cache = ARVideoKVCache(1, ARCacheConfig(sink_frames=0, recent_frames=0, mid_capacity=None, mid_pool=1, mid_topk=1))
    direction = torch.zeros(8)
    direction[3] = 1.0
    for j in range(4):
        k = torch.zeros(1, 1, 2, 8)
        if j == 1:
            k[..., 3] = 5.0  # the planted segment aligns with the queries
        cache.begin_commit(1)
        cache.write(0, k, torch.full((1, 1, 2, 8), float(j)), (1, 2))
        cache.end_commit()
    assert len(cache.layers[0].mid) == 4
    picked = cache.select_mid(0, direction.reshape(1, 1, 1, 8).expand(1, 1, 3, 8))
    assert len(picked) == 1 and int(picked[0].frames[0]) == 1


def test_moving_digits_clips():
    a = moving_digits(4, num_frames=10, size=16, num_digits=2, seed=3)
    b = moving_digits(4, num_frames=10, size=16, num_digits=2, seed=3)
    assert a.clips.shape == (4, 1, 10, 16, 16) and torch.equal(a.clips, b.clips)
    assert a.clips.min() >= -1 and a.clips.max() <= 1 and a.labels.shape == (4, 2)
    pos = a.positions
    assert pos.min() >= 0 and pos.max() <= 8  # digits stay on the canvas
    step = (pos[:, :, 1:] - pos[:, :, :-1]).abs()
    assert (step.sum(-1) > 0).float().mean() > 0.9 and step.max() <= 2  # digits move, at most max_speed
    assert not torch.equal(a.clips[:, :, 0], a.clips[:, :, 5])
    one = moving_digits(2, num_frames=3, size=8, seed=0)  # a canvas as small as a digit: still digits
    assert (one.positions == 0).all() and one.clips.shape == (2, 1, 3, 8, 8)
    only = moving_digits(5, num_frames=2, classes=[7], seed=1)
    assert (only.labels == 7).all()
