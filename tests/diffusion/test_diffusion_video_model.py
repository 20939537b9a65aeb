"""The trained video-dit-moving-digits model, its clip metrics and the KV-cache layout benchmark."""

import json

import pytest
import torch

from infercache.diffusion.video import ARCacheConfig, ARVideoKVCache, moving_digits
from infercache.diffusion.video.bench import VideoBenchSetup, parse_layouts, run_video_bench
from infercache.diffusion.video.pretrained import VIDEO_CHECKPOINT_DIR, load_video_dit, locate_digit, video_quality


@pytest.fixture(scope="module")
def vmodel():
    return load_video_dit()


def test_checkpoint_is_small_and_registered():
    from infercache.models import list_models, load

    assert (VIDEO_CHECKPOINT_DIR / "model.safetensors").stat().st_size < 5e6
    cfg = json.loads((VIDEO_CHECKPOINT_DIR / "config.json").read_text())
    assert cfg["name"] == "video-dit-moving-digits" and cfg["training"]["steps"] > 0
    model, extra = load("video-dit-moving-digits")
    assert extra is None and not model.training
    assert "video-dit-moving-digits" in {r["name"] for r in list_models()}


def test_locate_digit_finds_a_planted_digit():
    frames = -torch.ones(2, 16, 16)
    frames[0, 3:11, 5:13] = 1.0
    frames[1, 8:16, 0:8] = 1.0
    crops, corners = locate_digit(frames)
    assert corners.tolist() == [[3, 5], [8, 0]] and crops.shape == (2, 1, 8, 8)


def test_video_quality_separates_real_from_scrambled_clips():
    real = moving_digits(24, num_frames=8, size=16, seed=3).clips
    q = video_quality(real)
    assert q["identity_consistency"] > 0.9 and q["motion_ok"] == 1.0
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    scrambled = real.clone()
    scrambled[:, :, 1::2] = real[perm][:, :, 1::2]  # every other frame from another clip
    qs = video_quality(scrambled)
    assert qs["identity_consistency"] < q["identity_consistency"] - 0.2 and qs["motion_ok"] < 0.8


def test_trained_model_uses_its_cache(vmodel):
    """Denoising chunk 2 of a real clip is easier with its own first chunks in the cache than with another clip's:
    the model has learned to continue a clip (an untrained or context-blind model shows no gap)."""
    clips = moving_digits(16, num_frames=6, size=16, seed=7).clips
    other = clips.roll(1, dims=0)
    g = torch.Generator().manual_seed(0)
    target = clips[:, :, 4:6]
    noise = torch.randn(target.shape, generator=g)
    sigma = 0.8
    losses = []
    with torch.no_grad():
        for ctx in (clips, other):
            cache = ARVideoKVCache(len(vmodel.blocks), ARCacheConfig.unbounded())
            for j in range(2):
                vmodel(ctx[:, :, 2 * j : 2 * j + 2], 0.0, cache, commit=True)
            v = vmodel((1 - sigma) * target + sigma * noise, 1000 * sigma, cache)
            losses.append(float(((v - (noise - target)) ** 2).mean()))
    assert losses[0] < 0.8 * losses[1], losses


def test_video_bench_tiny(tmp_path, vmodel):
    with pytest.raises(ValueError, match="unknown KV-cache layout"):
        parse_layouts("sink_recent,nope")
    doc = run_video_bench(
        VideoBenchSetup(num_clips=2, frames=6, num_steps=2, timing=False),
        parse_layouts("sink_recent,recent2"),
        tmp_path,
        progress=False,
        model=vmodel,
    )
    rows = {r["layout"]: r for r in doc["results"]}
    assert set(rows) == {"real clips", "full", "sink_recent", "recent2"}
    # 6 frames: sink 2 + recent 4 holds every earlier frame, so nothing is evicted and positions agree
    assert rows["sink_recent"]["psnr"] > 60
    assert rows["recent2"]["cache_tokens_per_layer"] < rows["full"]["cache_tokens_per_layer"]
    assert (tmp_path / "samples.png").exists() and "| recent2 |" in (tmp_path / "bench.md").read_text()
