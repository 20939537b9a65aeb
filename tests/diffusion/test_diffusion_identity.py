"""Threshold 0 (or the policy's no-skip setting) must give bit-identical outputs; disable restores the model."""

import pytest
import torch
from dit_helpers import AGGRESSIVE, NO_SKIP, run

from infercache.diffusion import cache_stats, disable_cache, enable_cache


@pytest.mark.parametrize("policy", sorted(NO_SKIP))
@pytest.mark.parametrize("cfg_mode,guidance", [("batch", 2.0), ("calls", 2.0), ("batch", 1.0)])
def test_no_skip_is_bit_identical(model, policy, cfg_mode, guidance):
    transformer, scheduler = model
    ref = run(transformer, scheduler, guidance=guidance, cfg_mode=cfg_mode)
    enable_cache(transformer, policy, **NO_SKIP[policy])
    out = run(transformer, scheduler, guidance=guidance, cfg_mode=cfg_mode)
    stats = cache_stats(transformer)[-1]
    assert stats.steps_skipped == 0 and stats.steps_total == 12
    assert torch.equal(out, ref)


@pytest.mark.parametrize("policy", sorted(AGGRESSIVE))
def test_disable_restores_original_forward(model, policy):
    transformer, scheduler = model
    cls_forward = type(transformer).forward
    ref = run(transformer, scheduler)
    enable_cache(transformer, policy, **AGGRESSIVE[policy])
    cached = run(transformer, scheduler)
    assert cache_stats(transformer)[-1].steps_skipped > 0
    assert not torch.equal(cached, ref)
    assert disable_cache(transformer) is True
    assert disable_cache(transformer) is False
    for module in (transformer, *transformer.transformer_blocks):
        assert "forward" not in module.__dict__
        assert not hasattr(module, "_diffusers_hook")
    assert transformer.forward.__func__ is cls_forward
    assert torch.equal(run(transformer, scheduler), ref)
