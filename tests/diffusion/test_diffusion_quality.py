"""The trained dit-digits checkpoint is real: the digit classifier recognises its samples."""

import json

import torch
from dit_helpers import run

from infercache.diffusion import cache_stats, enable_cache
from infercache.diffusion.models import CHECKPOINT_DIR
from infercache.diffusion.quality import digit_accuracy, psnr

LABELS = torch.arange(20) % 10


def test_checkpoint_is_small_and_described():
    weights = CHECKPOINT_DIR / "model.safetensors"
    assert weights.exists() and weights.stat().st_size < 5_000_000
    info = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    assert info["model_class"] == "DiTTransformer2DModel" and info["training"]["steps"] > 0


def test_samples_are_recognised(model):
    transformer, scheduler = model
    images = run(transformer, scheduler, seed=123, steps=20, labels=LABELS)
    assert images.shape == (20, 1, 8, 8)
    acc = digit_accuracy(images, LABELS)
    assert acc > 0.6, f"classifier accuracy {acc:.2f} on 20 full-schedule samples (chance is 0.1)"


def test_cached_samples_stay_recognisable(model):
    transformer, scheduler = model
    ref = run(transformer, scheduler, seed=123, steps=20, labels=LABELS)
    enable_cache(transformer, "easycache", threshold=0.1)
    cached = run(transformer, scheduler, seed=123, steps=20, labels=LABELS)
    assert cache_stats(transformer)[-1].steps_skipped > 0
    assert psnr(cached, ref) > 20
    assert digit_accuracy(cached, LABELS) > 0.6
