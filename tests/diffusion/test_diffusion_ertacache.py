"""ERTACache: closed-form fits, the greedy schedule and its guards, JSON round-trip, the scheduler wrapper, and
quality on dit-digits with a calibrated schedule."""

import json

import numpy as np
import pytest
import torch
from dit_helpers import LABELS, NUM_STEPS, run

from infercache.diffusion import (
    ErtaSchedule,
    cache_stats,
    calibrate_ertacache,
    disable_cache,
    enable_cache,
    get_session,
)
from infercache.diffusion.hooks import SCHEDULER_ATTR
from infercache.diffusion.policies.ertacache import (
    build_schedule,
    channel_sums,
    fit_linear,
    pair_key,
    residual_error,
)
from infercache.diffusion.quality import digit_accuracy, psnr


def calib_run(transformer, scheduler, steps=NUM_STEPS):
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    return lambda: [run(transformer, scheduler, seed=100 + i, steps=steps, labels=labels) for i in range(2)]


def test_fit_linear_recovers_known_relation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, 4, generator=g)
    alpha, beta = torch.tensor([0.5, 1.2, -2.0]), torch.tensor([0.1, -0.3, 0.0])
    y = x * alpha.reshape(1, 3, 1, 1) + beta.reshape(1, 3, 1, 1)
    stats = channel_sums(x[:20], y[:20])
    for k, v in channel_sums(x[20:], y[20:]).items():  # sums add up over runs
        stats[k] = [a + b for a, b in zip(stats[k], v)]
    a, b = fit_linear(stats)
    np.testing.assert_allclose(a, alpha.tolist(), atol=1e-6)
    np.testing.assert_allclose(b, beta.tolist(), atol=1e-6)
    assert residual_error(stats, rectify=True) < 1e-6
    xd, yd = x.double(), y.double()
    raw = float(((yd - xd) ** 2).sum() / (yd**2).sum()) ** 0.5
    assert residual_error(stats, rectify=False) == pytest.approx(raw, rel=1e-9)
    assert residual_error(channel_sums(x, x), rectify=False) == 0.0


def test_build_schedule_respects_guards():
    zero = channel_sums(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))  # reuse error 0 for every pair
    stats = {"cond": {pair_key(k, i): zero for i in range(10) for k in range(i)}}
    s = build_schedule(stats, 10, 0.1, warmup_steps=2, last_steps=2, max_consecutive_skips=3)
    assert s.mask() == "CC...C..CC"
    assert s.source == [None, None, 1, 1, 1, None, 5, 5, None, None]
    assert build_schedule(stats, 10, 0.0).mask() == "C" * 10  # threshold 0 reuses nothing
    # a pair without statistics (farther apart than max_gap) is computed
    near = {"cond": {pair_key(k, i): zero for i in range(10) for k in range(i) if i - k <= 2}}
    assert build_schedule(near, 10, 0.1, last_steps=0).mask() == "C..C..C..C"


def test_threshold_zero_is_bit_identical(model):
    transformer, scheduler = model
    ref = run(transformer, scheduler)
    schedule = calibrate_ertacache(transformer, calib_run(transformer, scheduler), 0.0, scheduler=scheduler)
    assert not any(schedule.skip) and schedule.phi == [1.0] * NUM_STEPS
    enable_cache(transformer, "ertacache", schedule=schedule, scheduler=scheduler)
    assert "step" in vars(scheduler)  # the scheduler step is wrapped...
    out = run(transformer, scheduler)
    assert cache_stats(transformer)[-1].steps_skipped == 0
    assert torch.equal(out, ref)
    disable_cache(transformer)
    assert "step" not in vars(scheduler) and not hasattr(scheduler, SCHEDULER_ATTR)  # ...and restored
    assert scheduler.step.__func__ is type(scheduler).step


def test_schedule_json_roundtrip(model, tmp_path):
    transformer, scheduler = model
    schedule = calibrate_ertacache(transformer, calib_run(transformer, scheduler), 0.15, scheduler=scheduler)
    assert 0 < sum(schedule.skip) < NUM_STEPS and set(schedule.stats) == {"cond", "uncond"}
    assert any(p != 1.0 for p in schedule.phi)
    path = tmp_path / "ertacache.json"
    schedule.save(path)
    loaded = ErtaSchedule.load(path)
    assert loaded.to_dict() == schedule.to_dict()
    assert json.loads(path.read_text())["format"] == "infercache.ertacache/1"
    outs = []
    for sched in (schedule, loaded, str(path)):
        enable_cache(transformer, "ertacache", schedule=sched, scheduler=scheduler)
        outs.append(run(transformer, scheduler))
        assert cache_stats(transformer)[-1].skip_mask["cond"] == schedule.skip
        disable_cache(transformer)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="not an ERTACache schedule"):
        ErtaSchedule.from_dict({"format": "other"})


def test_rectification_never_increases_profiled_error(model):
    transformer, scheduler = model
    schedule = calibrate_ertacache(transformer, calib_run(transformer, scheduler), 0.2, adjust_timestep=False)
    for by_pair in schedule.stats.values():
        for stats in by_pair.values():
            assert residual_error(stats, True) <= residual_error(stats, False) + 1e-12


def test_timestep_adjustment_scales_the_step(model):
    # phi = 0 on every reused step freezes the latent after step 0's Euler update: x1 = x0 + (s1 - s0) * v0.
    transformer, scheduler = model
    phi = [1.0] + [0.0] * (NUM_STEPS - 1)
    enable_cache(
        transformer, "ertacache", schedule=ErtaSchedule.fixed([False] + [True] * (NUM_STEPS - 1), phi),
        scheduler=scheduler,
    )  # fmt: skip
    out = run(transformer, scheduler, seed=4)
    disable_cache(transformer)
    x0 = torch.randn(len(LABELS), 1, 8, 8, generator=torch.Generator().manual_seed(4))
    scheduler.set_timesteps(NUM_STEPS)
    t0 = scheduler.timesteps[0].expand(2 * len(LABELS))
    with torch.no_grad():
        c, u = transformer(
            torch.cat([x0, x0]), timestep=t0, class_labels=torch.cat([LABELS, torch.full_like(LABELS, 10)])
        ).sample.chunk(2)
    x1 = x0 + (scheduler.sigmas[1] - scheduler.sigmas[0]) * (u + 2.0 * (c - u))
    torch.testing.assert_close(out, x1.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_errors(model):
    transformer, scheduler = model
    with pytest.raises(ValueError, match="scheduler"):
        enable_cache(transformer, "ertacache", schedule=ErtaSchedule.fixed([False] * NUM_STEPS))
    assert get_session(transformer) is None and "step" not in vars(scheduler)
    enable_cache(transformer, "ertacache", schedule=ErtaSchedule.fixed([False] * 5), scheduler=scheduler)
    with pytest.raises(ValueError, match="calibrated for 5 steps"):
        run(transformer, scheduler)


def test_quality_on_dit_digits_with_calibrated_schedule(model):
    transformer, scheduler = model
    schedule = calibrate_ertacache(transformer, calib_run(transformer, scheduler, steps=20), 0.15, scheduler=scheduler)
    labels = torch.arange(20) % 10
    ref = run(transformer, scheduler, seed=11, steps=20, labels=labels)
    enable_cache(transformer, "ertacache", schedule=schedule, scheduler=scheduler)
    out = run(transformer, scheduler, seed=11, steps=20, labels=labels)
    stats = cache_stats(transformer)[-1]
    assert stats.steps_skipped >= 5, schedule.mask()
    assert psnr(out, ref) > 25
    assert digit_accuracy(out, labels) > 0.6  # chance is 0.1
