"""ARVideoKVCache bound to diffusers' WanTransformer3DModel (random-init tiny config: mechanics only)."""

import pytest
import torch

from infercache.diffusion.video import (
    ARCacheConfig,
    WanARContext,
    WanARKVAttnProcessor,
    max_cache_tokens,
    wan_forward_block_causal,
    wan_generate_chunk,
    wan_generate_video,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

torch.set_num_threads(1)
CF, H, W, C = 2, 8, 8, 4  # latent frames per chunk, latent height/width, channels; patch (1, 2, 2): 16 tokens/frame
PER_FRAME = (H // 2) * (W // 2)


def tiny_wan(**kw):
    torch.manual_seed(0)
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=C,
        out_channels=C,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=64,
    )
    cfg.update(kw)
    return WanTransformer3DModel(**cfg).eval()


@pytest.fixture(scope="module")
def wan():
    return tiny_wan()


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text(seed=100, b=1):
    return rand(b, 8, 32, seed=seed)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["absolute", "rebased"])
@pytest.mark.parametrize("batch", [1, 2])
def test_chunked_equals_block_causal_full_forward(wan, positions, batch):
    """No eviction: every denoising read and every commit forward equals the stock processor + block-causal mask
    over the whole clip (clean earlier chunks at timestep 0, the current chunk at its own timestep)."""
    ehs = text(b=batch)
    clean = [rand(batch, C, CF, H, W, seed=j) for j in range(4)]
    noisy = [rand(batch, C, CF, H, W, seed=10 + j) for j in range(4)]
    ts = [700.0, 250.0, 999.0, 500.0]
    with WanARContext(wan, ARCacheConfig.unbounded(positions)) as ctx:
        for j in range(4):
            ref = wan_forward_block_causal(wan, torch.cat(clean[:j] + [noisy[j]], 2), [0.0] * j + [ts[j]], ehs, CF)
            got = ctx(noisy[j], ts[j], ehs)
            torch.testing.assert_close(got, ref[:, :, j * CF :], atol=1e-5, rtol=1e-5)
            before = (ctx.cache.num_frames, ctx.cache.memory_bytes())
            ctx(noisy[j], 100.0, ehs)  # a second denoising step reads the same cache and writes nothing
            assert (ctx.cache.num_frames, ctx.cache.memory_bytes()) == before
            written = ctx.commit(clean[j], ehs)
            ref_clean = wan_forward_block_causal(wan, torch.cat(clean[: j + 1], 2), [0.0] * (j + 1), ehs, CF)
            torch.testing.assert_close(written, ref_clean[:, :, j * CF :], atol=1e-5, rtol=1e-5)
            kpos, qpos = ctx.last_positions[0]
            assert qpos.tolist() == [float(j * CF), float(j * CF + 1)]  # temporal offset of the chunk
            assert kpos.numel() == j * CF * PER_FRAME
        assert ctx.cache.commits == 4 and ctx.cache.num_frames == 4 * CF


@torch.no_grad()
def test_first_chunk_equals_stock_forward(wan):
    """An empty cache: the chunk forward is the stock forward (positions start at 0)."""
    x, ehs = rand(1, C, CF, H, W, seed=3), text()
    stock = wan(x, torch.tensor([600.0]), ehs, return_dict=False)[0]
    with WanARContext(wan, ARCacheConfig.unbounded()) as ctx:
        torch.testing.assert_close(ctx(x, 600.0, ehs), stock, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_eviction_bounds_memory_and_rebases_positions(wan):
    cfg = ARCacheConfig(sink_frames=2, recent_frames=4, mid_capacity=1, mid_pool=2, positions="rebased")
    ehs = text()
    bytes_per_chunk, qmax = [], []
    ctx = WanARContext(wan, cfg)
    try:
        for j in range(8):
            wan_generate_chunk(ctx, rand(1, C, CF, H, W, seed=j), ehs, num_steps=2)
            bytes_per_chunk.append(ctx.cache.memory_bytes())
            for layer in range(len(wan.blocks)):
                kpos, qpos = ctx.last_positions[layer]  # from the commit forward of chunk j
                kept = kpos.unique()
                assert kept.tolist() == list(range(len(kept)))  # gap-free
                assert qpos.tolist() == [float(len(kept)), float(len(kept) + 1)]  # right after the kept frames
                ck, _, ck_pos, cq_pos = ctx.cache.context(layer, torch.zeros(1, 2, 1, 16), CF)
                qmax.append(int(qpos.max()))
            lc = ctx.cache.layers[0]
            assert lc.frames("sink") <= 2 and lc.frames("recent") <= 4 and len(lc.mid) <= 1
        assert len(lc.mid) == 1 and lc.mid[0].compressed and lc.tokens("mid") == CF * PER_FRAME // 4  # pooled 2x2
    finally:
        ctx.remove()
    # what the cache says now (after the last commit) is what the next chunk would use
    assert cq_pos.tolist() == [float(ck_pos.unique().numel()), float(ck_pos.unique().numel() + 1)]
    assert ctx.cache.num_frames == 16  # absolute frames keep growing ...
    assert max(qmax) < 2 + CF + 4 + CF  # ... rebased positions stay below sink + mid + recent + chunk
    assert bytes_per_chunk[-1] == bytes_per_chunk[-2] == bytes_per_chunk[-3]  # memory stopped growing
    bound = max_cache_tokens(cfg, PER_FRAME, CF)
    per_token = 2 * 2 * 16 * 4  # K and V, heads, head dim, fp32
    assert max(bytes_per_chunk) <= len(wan.blocks) * bound * per_token


@torch.no_grad()
def test_recent_window_is_shift_invariant(wan):
    """With a recent-only window the kept frames are contiguous, so rebased positions are absolute ones shifted:
    RoPE is relative, hence the outputs agree (this checks the temporal RoPE is applied at the cache's positions)."""
    ehs = text()
    outs = {}
    for positions in ("absolute", "rebased"):
        cfg = ARCacheConfig(sink_frames=0, recent_frames=4, mid_capacity=0, positions=positions)
        with WanARContext(wan, cfg) as ctx:
            for j in range(5):
                ctx.commit(rand(1, C, CF, H, W, seed=j), ehs)
            outs[positions] = ctx(rand(1, C, CF, H, W, seed=99), 500.0, ehs)
            q = ctx.last_positions[0][1].tolist()
        assert q == ([10.0, 11.0] if positions == "absolute" else [4.0, 5.0])
    torch.testing.assert_close(outs["absolute"], outs["rebased"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_remove_restores_stock_bit_exact(wan):
    x, ehs, t = rand(1, C, 3, H, W, seed=7), text(), torch.tensor([321.0])
    stock_procs = dict(wan.attn_processors)
    before = wan(x, t, ehs, return_dict=False)[0]
    video, cache = wan_generate_video(wan, ehs, num_chunks=3, chunk_frames=CF, height=H, width=W, num_steps=2)
    assert video.shape == (1, C, 3 * CF, H, W) and cache.commits == 3
    ctx = WanARContext(wan, ARCacheConfig())
    assert isinstance(wan.blocks[0].attn1.processor, WanARKVAttnProcessor)
    assert not isinstance(wan.blocks[0].attn2.processor, WanARKVAttnProcessor)  # cross-attention stays stock
    ctx.commit(rand(1, C, CF, H, W, seed=1), ehs)
    ctx.remove()
    after = wan(x, t, ehs, return_dict=False)[0]
    assert torch.equal(before, after)
    assert all(wan.attn_processors[k] is p for k, p in stock_procs.items())


@torch.no_grad()
def test_unsupported_configs_raise(wan):
    with pytest.raises(ValueError, match="image conditioning"):
        WanARContext(tiny_wan(image_dim=32, added_kv_proj_dim=32), ARCacheConfig())
    x, ehs, t = rand(1, C, CF, H, W, seed=0), text(), torch.tensor([100.0])
    ctx = WanARContext(wan, ARCacheConfig())
    try:
        # the processor on every attention layer (cross-attention too) is refused at call time
        from infercache.diffusion.video.wan import _ARState

        wan.set_attn_processor(WanARKVAttnProcessor(0, _ARState(ctx.cache, wan.rope, grid=(CF, H // 2, W // 2))))
        with pytest.raises(ValueError, match="cross-attention"):
            wan(x, t, ehs)
    finally:
        ctx.remove()
    with WanARContext(wan, ARCacheConfig()):
        with pytest.raises(RuntimeError, match="outside WanARContext"):
            wan(x, t, ehs)  # called directly, not through the context
    # absolute positions past the model's RoPE table
    with WanARContext(tiny_wan(rope_max_seq_len=5), ARCacheConfig.unbounded("absolute")) as ctx:
        ctx.commit(x, ehs)
        ctx.commit(x, ehs)
        with pytest.raises(ValueError, match="rope_max_seq_len"):
            ctx(x, 100.0, ehs)
    assert torch.equal(wan(x, t, ehs, return_dict=False)[0], wan(x, t, ehs, return_dict=False)[0])
