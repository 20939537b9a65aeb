"""State is reset between pipeline calls: a second call gives what a fresh cache would give."""

import pytest
import torch
from dit_helpers import manual_loop, run

from infercache.diffusion import ErtaSchedule, cache_stats, disable_cache, enable_cache
from infercache.diffusion.tracker import TrajectoryTracker

# No warm-up, so that a stale cache from the previous call could be reused at step 0.
SETTINGS = {
    "easycache": dict(threshold=0.3, warmup_steps=0, warmup_ratio=None),
    "teacache": dict(threshold=0.5, warmup_steps=0),
    "magcache": dict(threshold=0.3, mag_ratios=[1.01] * 12, warmup_ratio=None),
    "first_block_cache": dict(threshold=0.3),
    "taylorseer": dict(cache_interval=3, warmup_steps=0),
    "profiling_dit": dict(background_blocks=[1, 2], step_interval=3, warmup_steps=0),
    "ertacache": dict(schedule=ErtaSchedule.fixed([False] + [True, True, False] * 3 + [True, True])),
}
OTHER = torch.tensor([7, 3, 3, 9, 0, 1])


@pytest.mark.parametrize("policy", sorted(SETTINGS))
@pytest.mark.parametrize("loop", ["sample", "manual"])
def test_second_call_equals_fresh(model, policy, loop):
    transformer, scheduler = model

    def call(seed, labels):
        if loop == "sample":
            return run(transformer, scheduler, seed=seed, labels=labels)
        return manual_loop(transformer, scheduler, seed=seed, labels=labels)

    session = enable_cache(transformer, policy, scheduler=scheduler, **SETTINGS[policy])
    call(0, torch.arange(6))
    first_state = session.states["cond"]
    second = call(1, OTHER)
    assert session.states["cond"] is not first_state
    history = cache_stats(transformer)
    assert len(history) == 2 and all(h.steps_total == 12 and h.num_steps == 12 for h in history)
    assert history[-1].steps_skipped > 0
    disable_cache(transformer)
    enable_cache(transformer, policy, scheduler=scheduler, **SETTINGS[policy])
    fresh = call(1, OTHER)
    assert torch.equal(second, fresh)


def test_tracker_rules():
    tr = TrajectoryTracker()
    sig = ((2, 1, 8, 8),)
    assert tr.observe(900.0, sig).new_trajectory
    p = tr.observe(900.0, sig)
    assert (p.step, p.slot, p.new_trajectory) == (0, 1, False)
    p = tr.observe(800.0, sig)
    assert (p.step, p.slot, p.new_trajectory) == (1, 0, False)
    assert tr.observe(950.0, sig).new_trajectory  # timestep went up
    assert tr.observe(900.0, ((4, 1, 8, 8),)).new_trajectory  # shape changed
    tr.num_steps = 2
    tr.observe(100.0, sig)
    tr.observe(50.0, sig)
    assert tr.observe(20.0, sig).new_trajectory  # more steps than the trajectory has
    tr.request_new()
    assert tr.observe(10.0, sig).new_trajectory
