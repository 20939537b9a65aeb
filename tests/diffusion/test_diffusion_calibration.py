import numpy as np
import pytest
import torch
from dit_helpers import NUM_STEPS, run

from infercache.diffusion import (
    cache_stats,
    calibrate_magcache,
    calibrate_teacache,
    disable_cache,
    enable_cache,
    fit_teacache_polynomial,
    get_session,
    record_calibration,
)
from infercache.diffusion.policies.magcache import nearest_interp


def test_fit_recovers_known_polynomial():
    true = [40.0, -25.0, 6.0, 0.4, 0.02]
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.5, 400)
    y = np.polyval(true, x) + rng.normal(0.0, 1e-6, x.shape)
    fit = fit_teacache_polynomial(x, y, degree=4)
    np.testing.assert_allclose(fit, true, rtol=1e-3, atol=1e-3)
    assert fit_teacache_polynomial(x, 3 * x + 1, degree=1) == pytest.approx([3.0, 1.0])
    with pytest.raises(ValueError, match="more than 4"):
        fit_teacache_polynomial([0.1, 0.2], [0.1, 0.2])


def test_calibrate_teacache_on_dit_digits(model):
    transformer, scheduler = model
    traces = record_calibration(transformer, lambda: [run(transformer, scheduler, seed=s) for s in (0, 1)])
    assert len(traces) == 4 and {t.branch for t in traces} == {"cond", "uncond"}
    assert all(len(t.probe_change) == NUM_STEPS and t.probe_change[0] is None for t in traces)
    coeffs = calibrate_teacache(transformer, lambda: run(transformer, scheduler), degree=2)
    assert len(coeffs) == 3 and all(np.isfinite(coeffs))
    session = enable_cache(transformer, "teacache", coefficients=coeffs, threshold=0.3)
    run(transformer, scheduler)
    assert 0 < cache_stats(transformer)[-1].steps_skipped < NUM_STEPS
    assert session.policy.rescale(0.1) == pytest.approx(np.polyval(coeffs, 0.1))


def test_calibrate_magcache_on_dit_digits(model):
    transformer, scheduler = model
    ratios = calibrate_magcache(transformer, lambda: run(transformer, scheduler))
    assert set(ratios) == {"cond", "uncond"}
    for r in ratios.values():
        assert len(r) == NUM_STEPS and r[0] == 1.0 and all(0.2 < v < 5 for v in r)
    enable_cache(transformer, "magcache", mag_ratios=ratios, threshold=0.5)
    out = run(transformer, scheduler)
    assert cache_stats(transformer)[-1].steps_skipped > 0 and torch.isfinite(out).all()


def test_nearest_interp():
    assert nearest_interp([1.0, 2.0, 3.0], 5) == [1.0, 1.0, 2.0, 3.0, 3.0]  # round half to even, like torch.round
    assert nearest_interp([1.0, 2.0, 3.0], 3) == [1.0, 2.0, 3.0]
    assert nearest_interp([1.0, 2.0, 3.0], 1) == [3.0]


def test_shipped_dit_digits_calibration(model):
    transformer, scheduler = model
    enable_cache(transformer, "teacache", coefficients="dit-digits", threshold=0.2)
    run(transformer, scheduler, steps=20)
    teacache = cache_stats(transformer)[-1]
    disable_cache(transformer)
    enable_cache(transformer, "magcache", mag_ratios="dit-digits", threshold=0.12)
    run(transformer, scheduler, steps=20)
    magcache = cache_stats(transformer)[-1]
    assert 0 < teacache.steps_skipped < 20 and 0 < magcache.steps_skipped < 20
    disable_cache(transformer)
    with pytest.raises(ValueError, match="known: flux"):
        enable_cache(transformer, "teacache", coefficients="sd3")
    assert get_session(transformer) is None  # a failed enable leaves no hooks behind
