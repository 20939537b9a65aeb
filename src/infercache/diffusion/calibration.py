"""Calibration from full runs: TeaCache's rescaling polynomial and MagCache's magnitude ratios, for any model.

``run`` is any callable that runs one or more *uncached* sampling calls with the model (a pipeline call, or
``lambda: sample(...)``); a recorder hook watches them, one trace per trajectory and CFG branch::

    coeffs = calibrate_teacache(transformer, lambda: sample(transformer, sched, labels, 20, 2.0), degree=4)
    enable_cache(transformer, "teacache", coefficients=coeffs, threshold=0.3)

TeaCache (ali-vilab/TeaCache#2): pairs ``(rel_l1(probe_t, probe_{t-1}), rel_l1(out_t, out_{t-1}))`` over every
step of every run, then ``np.polyfit(x, y, degree)``. MagCache: ``gamma_t = mean_tokens(||r_t|| / ||r_{t-1}||)``
of the block-stack residual (``gamma_0 = 1``), averaged over runs per branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .blocks import rel_l1
from .config import CacheConfig
from .hooks import disable_cache, enable_cache
from .policies.base import BranchState, CachePolicy, ProbeInput, StepInfo
from .policies.teacache import compute_probe

logger = logging.getLogger(__name__)


@dataclass
class RecorderConfig(CacheConfig):
    """Never skips; records what the calibrations need. ``probe``: TeaCache probe kind, or ``None``."""

    probe: str | None = "modulated"
    warmup_steps: int = 0
    last_steps: int = 0


@dataclass
class CalibrationTrace(BranchState):
    """One branch of one trajectory: per-step probe change, model-output change (``None`` at step 0) and
    residual magnitude ratio (1.0 at step 0)."""

    branch: str = ""
    probe_change: list[float | None] = field(default_factory=list)
    output_change: list[float | None] = field(default_factory=list)
    mag_ratio: list[float] = field(default_factory=list)
    prev_probe: torch.Tensor | None = None
    prev_out: torch.Tensor | None = None
    prev_residual: torch.Tensor | None = None


class RecorderPolicy(CachePolicy):
    """A policy that never skips and records calibration traces (not in the registry)."""

    name = "record"
    config_class = RecorderConfig
    state_class = CalibrationTrace

    def __init__(self, config: RecorderConfig) -> None:
        super().__init__(config)
        self.traces: list[CalibrationTrace] = []

    @property
    def threshold(self) -> float:
        return 0.0

    def can_reuse(self, state: BranchState) -> bool:
        return False

    def probe(self, state: CalibrationTrace, inp: ProbeInput, step: StepInfo) -> torch.Tensor | None:
        if not state.branch:
            state.branch = step.branch
            self.traces.append(state)
        return compute_probe(self.config.probe, inp) if self.config.probe else None

    def observe(self, state: CalibrationTrace, probe: Any, skipped: bool, step: StepInfo) -> None:
        if probe is not None:
            state.probe_change.append(rel_l1(probe, state.prev_probe) if state.prev_probe is not None else None)
            state.prev_probe = probe

    def record(self, state: CalibrationTrace, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        r = (x_out - x_in).float()
        if state.prev_residual is None:
            state.mag_ratio.append(1.0)
        else:
            num = torch.linalg.norm(r, dim=-1)
            den = torch.linalg.norm(state.prev_residual, dim=-1)
            state.mag_ratio.append(float((num / (den + 1e-8)).mean()))
        state.prev_residual = r

    def on_model_output(self, state: CalibrationTrace, x: torch.Tensor, out: torch.Tensor, step: StepInfo) -> None:
        state.output_change.append(rel_l1(out, state.prev_out) if state.prev_out is not None else None)
        state.prev_out = out.float()


def record_calibration(
    pipe_or_transformer: Any,
    run: Callable[[], Any],
    *,
    probe: str | None = "modulated",
    scheduler: Any = None,
    **config: Any,
) -> list[CalibrationTrace]:
    """Run ``run()`` with a recorder attached and return one trace per (trajectory, CFG branch)."""
    policy = RecorderPolicy(RecorderConfig(probe=probe, **config))
    enable_cache(pipe_or_transformer, policy, scheduler=scheduler)
    try:
        run()
    finally:
        disable_cache(pipe_or_transformer)
    for t in policy.traces:  # free the tensors, keep the numbers
        t.prev_probe = t.prev_out = t.prev_residual = None
    if not policy.traces:
        raise RuntimeError("run() made no call to the model: nothing to calibrate from")
    return policy.traces


def fit_teacache_polynomial(x: Sequence[float], y: Sequence[float], degree: int = 4) -> list[float]:
    """Least-squares polynomial ``y ~ poly(x)`` (``np.polyfit``; highest degree first, like ``np.poly1d``)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D sequences of the same length")
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} (x, y) pairs to fit a degree-{degree} polynomial, got {len(x)}")
    return [float(c) for c in np.polyfit(x, y, degree)]


def teacache_pairs(traces: Sequence[CalibrationTrace]) -> tuple[list[float], list[float]]:
    """The ``(probe change, output change)`` pairs of all traces."""
    xs, ys = [], []
    for t in traces:
        for a, b in zip(t.probe_change, t.output_change, strict=False):
            if a is not None and b is not None:
                xs.append(a)
                ys.append(b)
    return xs, ys


def calibrate_teacache(
    pipe_or_transformer: Any, run: Callable[[], Any], degree: int = 4, probe: str = "modulated", **kwargs: Any
) -> list[float]:
    """Fit TeaCache's rescaling polynomial for this model from the full runs made by ``run()``."""
    traces = record_calibration(pipe_or_transformer, run, probe=probe, **kwargs)
    x, y = teacache_pairs(traces)
    coeffs = fit_teacache_polynomial(x, y, degree=degree)
    resid = np.asarray(y) - np.polyval(coeffs, x)
    r2 = 1.0 - float(np.sum(resid**2) / max(np.sum((np.asarray(y) - np.mean(y)) ** 2), 1e-30))
    logger.info("TeaCache fit on %d pairs, probe change in [%.3g, %.3g]: R^2 = %.3f", len(x), min(x), max(x), r2)
    return coeffs


def calibrate_magcache(pipe_or_transformer: Any, run: Callable[[], Any], **kwargs: Any) -> dict[str, list[float]]:
    """MagCache magnitude ratios per CFG branch (``{"cond": [...], "uncond": [...]}``), averaged over runs."""
    traces = record_calibration(pipe_or_transformer, run, probe=None, **kwargs)
    by_branch: dict[str, list[list[float]]] = {}
    for t in traces:
        by_branch.setdefault(t.branch, []).append(t.mag_ratio)
    out = {}
    for branch, runs in by_branch.items():
        n = min(len(r) for r in runs)
        if any(len(r) != n for r in runs):
            raise ValueError(
                f"runs of branch {branch!r} have different step counts; calibrate one step count at a time"
            )
        out[branch] = [round(float(v), 5) for v in np.mean([r[:n] for r in runs], axis=0)]
    return out


CALIBRATION_FORMAT = "infercache.diffusion.calibration/1"


def save_calibration(path: str | Any, policy: str, values: Any, **meta: Any) -> None:
    """Write calibrated values to JSON: ``policy`` is ``"teacache"`` (``values``: the polynomial coefficients) or
    ``"magcache"`` (``values``: ratios, a list or a per-branch dict). ``meta`` (model, steps, fit quality, ...) is
    stored alongside. ``enable_cache(model, policy, coefficients=path)`` / ``mag_ratios=path`` reads it back."""
    import json
    from pathlib import Path

    key = _CALIBRATION_KEYS.get(policy)
    if key is None:
        raise ValueError(f"no calibration file format for policy {policy!r}; known: {', '.join(_CALIBRATION_KEYS)}")
    doc = {"format": CALIBRATION_FORMAT, "policy": policy, key: values, **meta}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def load_calibration(path: str | Any, policy: str) -> Any:
    """The calibrated values of ``policy`` stored by :func:`save_calibration` (clear errors on a wrong file)."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"no calibration file {p}; make one with `infercache diffusion calibrate --policy {policy} --out {p}`"
        )
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{p} is not an infercache calibration file (format {CALIBRATION_FORMAT!r})")
    if doc.get("policy") != policy:
        raise ValueError(f"{p} holds a {doc.get('policy')!r} calibration, not a {policy!r} one")
    return doc[_CALIBRATION_KEYS[policy]]


_CALIBRATION_KEYS = {"teacache": "coefficients", "magcache": "mag_ratios"}
