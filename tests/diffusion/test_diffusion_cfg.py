"""Cond and uncond branches keep separate states, whether CFG is one batched call or two calls."""

import pytest
import torch
from dit_helpers import run

from infercache.diffusion import cache_stats, enable_cache, get_session
from infercache.diffusion.tracker import is_cfg_batch


def test_is_cfg_batch():
    x = torch.randn(3, 1, 8, 8)
    t = torch.full((6,), 500.0)
    assert is_cfg_batch(torch.cat([x, x]), t)
    assert not is_cfg_batch(torch.cat([x, x + 1e-3]), t)
    assert not is_cfg_batch(torch.cat([x, x]), torch.arange(6.0))
    assert not is_cfg_batch(x, t[:3])


@pytest.mark.parametrize("cfg_mode", ["batch", "calls"])
def test_states_are_per_branch(model, cfg_mode):
    transformer, scheduler = model
    session = enable_cache(transformer, "teacache", threshold=0.5)
    run(transformer, scheduler, cfg_mode=cfg_mode)
    assert set(session.states) == {"cond", "uncond"}
    cond, uncond = session.states["cond"].residual, session.states["uncond"].residual
    assert cond.shape == uncond.shape and cond.shape[0] == 6  # one half of the batch each
    assert not torch.allclose(cond, uncond)
    assert set(cache_stats(transformer)[-1].skip_mask) == {"cond", "uncond"}


def test_single_branch_without_cfg(model):
    transformer, scheduler = model
    session = enable_cache(transformer, "easycache")
    run(transformer, scheduler, guidance=1.0)
    assert set(session.states) == {"cond"}


@pytest.mark.parametrize(
    "policy,config",
    [("taylorseer", dict(cache_interval=3)), ("magcache", dict(threshold=0.5, mag_ratios=[1.02] * 12))],
)
def test_separate_calls_match_batched_cfg(model, policy, config):
    # With a schedule that does not depend on the data, both CFG layouts skip the same steps, so the outputs agree
    # (up to float noise) only if each branch reuses its *own* cache.
    transformer, scheduler = model
    ref = run(transformer, scheduler)
    enable_cache(transformer, policy, **config)
    batched = run(transformer, scheduler, cfg_mode="batch")
    mask_b = cache_stats(transformer)[-1].skip_mask
    calls = run(transformer, scheduler, cfg_mode="calls")
    mask_c = cache_stats(transformer)[-1].skip_mask
    assert mask_b == mask_c and sum(mask_b["cond"]) > 0
    assert (batched - ref).abs().max() > 1e-2  # caching changed the result...
    assert torch.allclose(batched, calls, atol=1e-4)  # ...identically in both layouts
    assert get_session(transformer) is not None
