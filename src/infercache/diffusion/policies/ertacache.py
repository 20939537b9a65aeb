"""ERTACache: an offline-profiled reuse schedule, a linear error correction, and an adjusted sampler step.

Paper: "ERTACache: Error Rectification and Timesteps Adjustment for Efficient Diffusion" (ByteDance, ICLR 2026),
https://arxiv.org/abs/2508.21091 (code: bytedance/ERTACache). Neither the method section nor the code was
available to us: the three components below follow the abstract and README, and **every formula is our
choice** (marked *choice*):

1. **Offline residual profiling → a fixed schedule.** :func:`infercache.diffusion.calibrate_ertacache` records
   the model outputs ``v_i`` of a few full runs, per CFG branch. For every pair ``k < i`` (``i - k <= max_gap``)
   it keeps per-channel sufficient statistics, from which it gets the *residual error* of reusing ``v_k`` at step
   ``i``: the relative RMS error ``sqrt(sum (v_i - v~_i)^2 / sum v_i^2)`` after the correction of point 2
   (*choice*: relative L2, so that it follows from the statistics). The schedule is built greedily (*choice*):
   going forward with ``k`` = the last computed step, step ``i`` reuses iff the error, the worse of the branches,
   is ``< threshold`` and the guards allow it. At run time the schedule is fixed: no online probe.
2. **Error rectification** (closed-form linear model of the cache error, *choice*: per channel ``c``):
   ``v~_i = alpha_c * v_k + beta_c``, the least-squares fit of ``v_i`` on ``v_k`` over the calibration runs, i.e.
   the error estimate ``e^ = (alpha - 1) v_k + beta`` is added to the cached output. Fitted per branch and per
   pair ``(k, i)``, so it is right even when a guard moved the last computed step.
3. **Timestep adjustment**: on a reused step the sampler's update is rescaled,
   ``x_{i+1} = x_i + phi_i * (step(x_i, v~) - x_i)``; for an Euler step this is exactly
   ``x_i + phi_i * dt_i * v~`` (the integration interval scaled by ``phi_i``). *Choice*: ``phi_i`` is
   "trajectory-aware": fitted in a second calibration pass that runs the cached sampler, as the least-squares
   ``phi`` that brings the cached trajectory's next state closest to the full run's, pooled over the runs and
   clipped to ``phi_range``. It is applied by wrapping ``scheduler.step`` (``enable_cache(..., scheduler=...)``,
   or the pipeline's scheduler).

Schedules are :class:`ErtaSchedule` objects, saved and reloaded as JSON (``save`` / ``load``). Options:
``schedule`` (required: an ``ErtaSchedule``, its dict or a JSON path), ``rectify`` and ``adjust_timestep`` (both
on; ``adjust_timestep=True`` needs the scheduler). Guards at run time default to none (``warmup_steps=0``,
``last_steps=0``): they were applied when the schedule was built; guards given here still apply on top. When a
guard or a CFG branch makes the run time differ from the schedule, a reused step still gets the rectification of
its actual pair ``(k, i)`` (if profiled) but ``phi = 1``. A schedule built with ``threshold=0`` reuses nothing, so
the output is bit-identical to the uncached model. The paper's parts we could not check: how the schedule is
searched (greedy here), the error measure, the form of the linear model, and how ``phi`` is computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CacheConfig
from ..registry import register_policy
from .base import BranchState, CachePolicy, StepInfo

SCHEDULE_FORMAT = "infercache.ertacache/1"
STAT_KEYS = ("n", "sx", "sy", "sxx", "sxy", "syy")


# --------------------------------------------------------------------------------------- pair statistics / fits
def channel_sums(x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel (dim 1) sufficient statistics of the pair ``(x, y)`` = ``(v_k, v_i)``."""
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"expected two (B, C, ...) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    c = x.shape[1]
    xd = x.detach().double().transpose(0, 1).reshape(c, -1)
    yd = y.detach().double().transpose(0, 1).reshape(c, -1)
    sums = {
        "n": [float(xd.shape[1])] * c,
        "sx": xd.sum(1),
        "sy": yd.sum(1),
        "sxx": (xd * xd).sum(1),
        "sxy": (xd * yd).sum(1),
        "syy": (yd * yd).sum(1),
    }
    return {k: (v if isinstance(v, list) else v.tolist()) for k, v in sums.items()}


def add_sums(acc: dict[str, list[float]] | None, new: dict[str, list[float]]) -> dict[str, list[float]]:
    if acc is None:
        return {k: list(v) for k, v in new.items()}
    for k in STAT_KEYS:
        acc[k] = [a + b for a, b in zip(acc[k], new[k], strict=True)]
    return acc


def fit_linear(stats: dict[str, list[float]], eps: float = 1e-12) -> tuple[list[float], list[float]]:
    """Per-channel least squares ``y ~ alpha * x + beta`` from the sufficient statistics."""
    alpha, beta = [], []
    for n, sx, sy, sxx, sxy in zip(*(stats[k] for k in STAT_KEYS[:5]), strict=True):
        mx, my = sx / n, sy / n
        vxx, vxy = sxx / n - mx * mx, sxy / n - mx * my
        a = vxy / vxx if vxx > eps else 1.0
        alpha.append(a)
        beta.append(my - a * mx)
    return alpha, beta


def residual_error(stats: dict[str, list[float]], rectify: bool = True) -> float:
    """Relative RMS error of predicting ``y`` by ``x`` (``rectify=False``) or by the linear fit (``True``)."""
    sse = tot = 0.0
    alpha, beta = fit_linear(stats) if rectify else (None, None)
    for c, (n, sx, sy, sxx, sxy, syy) in enumerate(zip(*(stats[k] for k in STAT_KEYS), strict=True)):
        if rectify:
            a, b = alpha[c], beta[c]
            e = syy - 2 * a * sxy - 2 * b * sy + a * a * sxx + 2 * a * b * sx + n * b * b
        else:
            e = syy - 2 * sxy + sxx
        sse += max(e, 0.0)
        tot += syy
    return math.sqrt(sse / tot) if tot > 0 else 0.0


def pair_key(k: int, i: int) -> str:
    return f"{k}>{i}"


# ----------------------------------------------------------------------------------------------- the schedule
@dataclass
class ErtaSchedule:
    """A calibrated ERTACache schedule (JSON round-trip: :meth:`save` / :meth:`load`).

    ``skip[i]``: step ``i`` reuses; ``source[i]``: the computed step it reuses (``None`` when computed);
    ``phi[i]``: the step scale (1.0 when computed); ``error[i]``: the profiled residual error of the scheduled
    reuse; ``stats[branch]["k>i"]``: per-channel sufficient statistics of ``(v_k, v_i)`` for the rectification.
    """

    num_steps: int
    skip: list[bool]
    source: list[int | None]
    phi: list[float]
    error: list[float | None] = field(default_factory=list)
    threshold: float | None = None
    rectify: bool = True
    stats: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("skip", "source", "phi"):
            if len(getattr(self, name)) != self.num_steps:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_steps} steps")
        if not self.error:
            self.error = [None] * self.num_steps
        self._fits: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}

    @classmethod
    def fixed(cls, skip: Sequence[bool], phi: Sequence[float] | None = None) -> ErtaSchedule:
        """A hand-made schedule (no statistics, so no rectification): ``skip[i]`` reuses the last computed step."""
        skip = [bool(s) for s in skip]
        source, last = [], None
        for i, s in enumerate(skip):
            source.append(last if s else None)
            if not s:
                last = i
        return cls(len(skip), skip, source, list(phi) if phi is not None else [1.0] * len(skip), rectify=False)

    @property
    def steps_computed(self) -> int:
        return sum(not s for s in self.skip)

    def mask(self) -> str:
        return "".join("." if s else "C" for s in self.skip)

    def coefficients(self, branch: str, k: int, i: int) -> tuple[list[float], list[float]] | None:
        """``(alpha, beta)`` per channel for reusing step ``k``'s output at step ``i`` (``None``: no statistics)."""
        by_pair = self.stats.get(branch) or self.stats.get("cond")
        if not by_pair or pair_key(k, i) not in by_pair:
            return None
        return fit_linear(by_pair[pair_key(k, i)])

    def coefficient_tensors(
        self, branch: str, k: int, i: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = (branch, k, i)
        if key not in self._fits:
            coeffs = self.coefficients(branch, k, i)
            if coeffs is None:
                self._fits[key] = None
            else:
                shape = (1, len(coeffs[0])) + (1,) * (like.ndim - 2)
                a = torch.tensor(coeffs[0], dtype=torch.float32).reshape(shape)
                b = torch.tensor(coeffs[1], dtype=torch.float32).reshape(shape)
                self._fits[key] = (a, b)
        fit = self._fits[key]
        if fit is None:
            return None
        return fit[0].to(like.device, like.dtype), fit[1].to(like.device, like.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": SCHEDULE_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErtaSchedule:
        if d.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"not an ERTACache schedule (format {d.get('format')!r}, want {SCHEDULE_FORMAT})")
        return cls(**{k: v for k, v in d.items() if k != "format"})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ErtaSchedule:
        return cls.from_dict(json.loads(Path(path).read_text()))


def build_schedule(
    stats: dict[str, dict[str, dict[str, list[float]]]],
    num_steps: int,
    threshold: float,
    *,
    rectify: bool = True,
    warmup_steps: int = 1,
    last_steps: int = 1,
    max_consecutive_skips: int | None = None,
) -> ErtaSchedule:
    """The greedy schedule for ``threshold`` from the pair statistics (see the module docstring)."""
    skip, source, error = [], [], []
    last, run = None, 0
    for i in range(num_steps):
        ok = i >= warmup_steps and i < num_steps - last_steps and last is not None
        ok = ok and (max_consecutive_skips is None or run < max_consecutive_skips)
        err = None
        if ok:
            errs = [residual_error(b[pair_key(last, i)], rectify) for b in stats.values() if pair_key(last, i) in b]
            err = max(errs) if errs and len(errs) == len(stats) else None
            ok = err is not None and err < threshold
        skip.append(ok)
        source.append(last if ok else None)
        error.append(round(err, 6) if ok else None)
        if ok:
            run += 1
        else:
            last, run = i, 0
    return ErtaSchedule(
        num_steps, skip, source, [1.0] * num_steps, error, threshold, rectify, stats,
        meta=dict(warmup_steps=warmup_steps, last_steps=last_steps, max_consecutive_skips=max_consecutive_skips),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- the policy
@dataclass
class ErtaCacheConfig(CacheConfig):
    """ERTACache options: ``schedule`` (required), ``rectify``, ``adjust_timestep`` (see the module docstring)."""

    schedule: Any = None  # ErtaSchedule | dict | str | Path
    rectify: bool = True
    adjust_timestep: bool = True
    warmup_steps: int = 0
    last_steps: int = 0


@dataclass
class ErtaCacheState(BranchState):
    v: torch.Tensor | None = None
    k: int | None = None


@register_policy("ertacache")
class ErtaCachePolicy(CachePolicy):
    config_class = ErtaCacheConfig
    state_class = ErtaCacheState
    level = "model"
    accumulate = False
    scheduler_hook = True

    def __init__(self, config: ErtaCacheConfig) -> None:
        super().__init__(config)
        sched = config.schedule
        if sched is None:
            raise ValueError(
                "ertacache needs a schedule: schedule=calibrate_ertacache(model, run, threshold=...) "
                "(an ErtaSchedule, its dict, or the path of its JSON)"
            )
        if isinstance(sched, (str, Path)):
            sched = ErtaSchedule.load(sched)
        elif isinstance(sched, dict):
            sched = ErtaSchedule.from_dict(sched)
        if not isinstance(sched, ErtaSchedule):
            raise TypeError(f"schedule must be an ErtaSchedule, its dict or a JSON path, got {type(sched).__name__}")
        self.schedule = sched
        # The scheduler is wrapped only when the step is adjusted (so ``adjust_timestep=False`` needs no scheduler).
        self.scheduler_hook = bool(config.adjust_timestep)
        #: Calibration hook: ``fn(session, step, sample, prev_sample) -> phi`` replaces the stored ``phi``.
        self.phi_fitter: Any = None

    @property
    def threshold(self) -> float:
        return 0.5  # distance is 0 (the schedule reuses) or inf (it computes)

    def distance(self, state: ErtaCacheState, probe: Any, step: StepInfo) -> float:
        n = self.schedule.num_steps
        if step.num_steps is not None and step.num_steps != n:
            raise ValueError(
                f"this ERTACache schedule was calibrated for {n} steps but the call has {step.num_steps}; "
                "calibrate one per step count"
            )
        return 0.0 if step.index < n and self.schedule.skip[step.index] else math.inf

    def can_reuse(self, state: ErtaCacheState) -> bool:
        return state.v is not None

    def reuse(self, state: ErtaCacheState, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        v = state.v
        if self.config.rectify:
            fit = self.schedule.coefficient_tensors(step.branch, state.k, step.index, v)
            if fit is not None:
                if fit[0].shape[1] != v.shape[1]:
                    raise ValueError(f"schedule has {fit[0].shape[1]} channels, the model output {v.shape[1]}")
                return v * fit[0] + fit[1]
        return v

    def record(self, state: ErtaCacheState, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        state.v, state.k = x_out, step.index

    def scheduler_step(
        self, session: Any, step: int, skipped: bool, sample: torch.Tensor, prev_sample: torch.Tensor
    ) -> torch.Tensor:
        if not skipped or not self.config.adjust_timestep:
            return prev_sample
        if self.phi_fitter is not None:
            phi = self.phi_fitter(session, step, sample, prev_sample)
        else:
            st = next(iter(session.states.values()), None)
            scheduled = step < self.schedule.num_steps and st is not None and st.k == self.schedule.source[step]
            phi = self.schedule.phi[step] if scheduled else 1.0
        if phi == 1.0:
            return prev_sample
        return sample + phi * (prev_sample - sample)
