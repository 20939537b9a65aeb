"""Peer adapters: diffusers' hooks and cache-dit's DBCache on dit-digits (mechanics, not speed)."""

import pytest
import torch
from dit_helpers import NUM_STEPS, run

from infercache.diffusion.bench import WorkCounter
from infercache.diffusion.peers import PEERS, enable_peer

# diffusers skips when the accumulated error is <= threshold, so ratios of exactly 1 would skip at threshold 0
RATIOS = [1.0] + [0.95] * (NUM_STEPS - 1)
# settings under which each peer must compute everything (its own "never skip")
EXACT = {
    "diffusers_first_block_cache": dict(threshold=0.0),
    "diffusers_magcache": dict(threshold=0.0),
    "diffusers_taylorseer": dict(cache_interval=1),
    "diffusers_pab": dict(spatial_attention_block_skip_range=1),
    "diffusers_fastercache": dict(
        spatial_attention_block_skip_range=1, unconditional_batch_skip_range=1
    ),
    "cachedit_dbcache": dict(residual_diff_threshold=0.0),
}
AGGRESSIVE = {
    "diffusers_first_block_cache": dict(threshold=10.0),
    "diffusers_magcache": dict(threshold=10.0),
    "diffusers_taylorseer": dict(cache_interval=4, disable_cache_before_step=2),
    "diffusers_pab": dict(spatial_attention_block_skip_range=4, spatial_attention_timestep_skip_range=(0, 1000)),
    "diffusers_fastercache": dict(spatial_attention_block_skip_range=2),
    "cachedit_dbcache": dict(residual_diff_threshold=10.0, max_warmup_steps=2),
}


def _needs(name):
    if name == "cachedit_dbcache":
        pytest.importorskip("cache_dit")


def _run_peer(transformer, scheduler, name, cfg, times=1):
    h = enable_peer(transformer, name, num_inference_steps=NUM_STEPS, mag_ratios=RATIOS, **cfg)
    counter = WorkCounter(transformer)
    try:
        outs = [run(transformer, scheduler, cfg_mode=h.cfg_mode) for _ in range(times)]
    finally:
        counter.remove()
        h.disable()
    return outs, counter.rows / times


@pytest.fixture(scope="module")
def reference(dit):
    transformer, scheduler = dit
    counter = WorkCounter(transformer)
    try:
        ref = run(transformer, scheduler)
    finally:
        counter.remove()
    return ref, counter.rows


def test_peer_table_is_complete():
    assert set(EXACT) == set(PEERS) == set(AGGRESSIVE)


def test_uncond_first_batch_matches_reference(model, reference):
    transformer, scheduler = model
    assert torch.equal(run(transformer, scheduler, cfg_mode="batch_uncond_first"), reference[0])


@pytest.mark.parametrize("name", PEERS)
def test_peer_never_skipping_is_exact_and_disable_restores(model, reference, name):
    _needs(name)
    transformer, scheduler = model
    ref, full = reference
    (out,), rows = _run_peer(transformer, scheduler, name, EXACT[name])
    assert rows == full
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert torch.equal(run(transformer, scheduler), ref)  # disabled: the original model again


@pytest.mark.parametrize("name", PEERS)
def test_peer_skips_and_resets_between_calls(model, reference, name):
    _needs(name)
    transformer, scheduler = model
    ref, full = reference
    (a, b), rows = _run_peer(transformer, scheduler, name, AGGRESSIVE[name], times=2)
    assert rows < 0.9 * full, f"{name} skipped nothing: the adapter did not bind"
    assert not torch.equal(a, ref)
    assert torch.equal(a, b), "second call differs: state was not reset per trajectory"
    assert torch.equal(run(transformer, scheduler), ref)


def test_unknown_peer_and_missing_ratios(model):
    transformer, _ = model
    with pytest.raises(ValueError, match="unknown peer"):
        enable_peer(transformer, "nope", num_inference_steps=4)
    with pytest.raises(ValueError, match="mag_ratios"):
        enable_peer(transformer, "diffusers_magcache", num_inference_steps=4)
