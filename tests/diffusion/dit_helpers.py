"""Helpers shared by the diffusion tests (sampling runs and per-policy settings)."""

import torch

from infercache.diffusion import ErtaSchedule, sample

NUM_STEPS = 12
LABELS = torch.arange(6) % 10


def run(transformer, scheduler, seed=0, guidance=2.0, cfg_mode="batch", steps=NUM_STEPS, labels=LABELS):
    return sample(
        transformer, scheduler, labels, steps, guidance, torch.Generator().manual_seed(seed), cfg_mode=cfg_mode
    )


def manual_loop(transformer, scheduler, seed=0, steps=NUM_STEPS, labels=LABELS, guidance=2.0):
    """A custom CFG loop that never calls begin_call (exercises automatic new-call detection)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, 8, 8, generator=g)
    null = torch.full_like(labels, 10)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            tb = t.expand(2 * len(labels))
            out = transformer(torch.cat([x, x]), timestep=tb, class_labels=torch.cat([labels, null])).sample
            c, u = out.chunk(2)
            x = scheduler.step(u + guidance * (c - u), t, x).prev_sample
    return x


# Settings that never skip, and settings that skip a lot, for every policy.
NO_SKIP = {
    "easycache": dict(threshold=0.0),
    "teacache": dict(threshold=0.0),
    "magcache": dict(threshold=0.0, mag_ratios=[1.0] * NUM_STEPS),
    "first_block_cache": dict(threshold=0.0),
    "taylorseer": dict(cache_interval=1),
    "profiling_dit": dict(background_blocks=[0, 1, 2, 3], step_interval=1, warmup_steps=0),
    "ertacache": dict(schedule=ErtaSchedule.fixed([False] * NUM_STEPS), adjust_timestep=False),
}
AGGRESSIVE = {
    "easycache": dict(threshold=100.0),
    "teacache": dict(threshold=100.0),
    "magcache": dict(threshold=100.0, mag_ratios=[1.0] * NUM_STEPS, max_consecutive_skips=None),
    "first_block_cache": dict(threshold=100.0),
    "taylorseer": dict(cache_interval=100),
    # every block cached, so a partial step skips the whole stack (the guard tests count the last block's runs)
    "profiling_dit": dict(background_blocks=[0, 1, 2, 3], step_interval=100, warmup_steps=1),
    "ertacache": dict(schedule=ErtaSchedule.fixed([False] + [True] * (NUM_STEPS - 1)), adjust_timestep=False),
}
