"""Warm-up and last steps are always computed; never more than max_consecutive_skips in a row."""

import pytest
from dit_helpers import AGGRESSIVE, NUM_STEPS, run

from infercache.diffusion import cache_stats, enable_cache

GUARDS = dict(warmup_steps=3, last_steps=2, max_consecutive_skips=2)


def count_tail_runs(transformer):
    calls = []
    handle = transformer.transformer_blocks[-1].attn1.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def longest_run(mask):
    best = cur = 0
    for s in mask:
        cur = cur + 1 if s else 0
        best = max(best, cur)
    return best


@pytest.mark.parametrize("policy", sorted(AGGRESSIVE))
@pytest.mark.parametrize("cfg_mode", ["batch", "calls"])
def test_guards_respected(model, policy, cfg_mode):
    transformer, scheduler = model
    enable_cache(transformer, policy, **{**AGGRESSIVE[policy], **GUARDS})
    calls, handle = count_tail_runs(transformer)
    try:
        run(transformer, scheduler, cfg_mode=cfg_mode)
    finally:
        handle.remove()
    stats = cache_stats(transformer)[-1]
    assert set(stats.skip_mask) == {"cond", "uncond"}
    for branch, mask in stats.skip_mask.items():
        assert len(mask) == NUM_STEPS
        assert not any(mask[:3]), (branch, stats.reasons[branch])
        assert not any(mask[-2:]), (branch, stats.reasons[branch])
        assert longest_run(mask) <= 2, (branch, mask)
        assert sum(mask) >= 3, f"{policy} should skip with an aggressive setting: {stats.reasons[branch]}"
    # The last block really ran exactly once per computed branch-call (one batched call in batch mode).
    computed = sum(not s for m in stats.skip_mask.values() for s in m)
    assert len(calls) == (stats.steps_computed if cfg_mode == "batch" else computed)


@pytest.mark.parametrize("policy", sorted(AGGRESSIVE))
def test_unbounded_skips_without_cap(model, policy):
    transformer, scheduler = model
    enable_cache(
        transformer, policy, **{**AGGRESSIVE[policy], "warmup_steps": 3, "last_steps": 1, "max_consecutive_skips": None}
    )
    run(transformer, scheduler)
    mask = cache_stats(transformer)[-1].skip_mask["cond"]
    # taylorseer's fixed schedule computes step 4, profiling_dit's step 3 (= step_start)
    expect = {"taylorseer": 6, "profiling_dit": 7}.get(policy, NUM_STEPS - 3 - 1)
    assert longest_run(mask) == expect, mask
