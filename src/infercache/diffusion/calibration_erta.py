"""ERTACache calibration: residual profiling on full runs, the greedy schedule, and the fitted step scales.

    schedule = calibrate_ertacache(transformer, run, threshold=0.1, scheduler=scheduler)
    schedule.save("ertacache-20-steps.json")          # reload with ErtaSchedule.load(path)
    enable_cache(transformer, "ertacache", schedule=schedule, scheduler=scheduler)

``run`` makes one or more full sampling calls with the model and the scheduler and must be **deterministic**
(fixed seeds): the second pass replays the same calls with the cache on to fit the step scales ``phi``
(see ``policies/ertacache.py`` for the method and which parts are our choices).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import CacheConfig
from .hooks import _resolve, disable_cache, enable_cache, get_session
from .policies.base import BranchState, CachePolicy, StepInfo
from .policies.ertacache import ErtaSchedule, add_sums, build_schedule, channel_sums, pair_key

logger = logging.getLogger(__name__)
_NOT_DETERMINISTIC = "the second calibration pass made other calls than the first: run() must be deterministic"


@dataclass
class _RecorderConfig(CacheConfig):
    max_gap: int = 8
    warmup_steps: int = 0
    last_steps: int = 0


@dataclass
class _RecorderState(BranchState):
    recent: deque = field(default_factory=deque)  # (step, output) of the last max_gap steps


class _ErtaRecorder(CachePolicy):
    """Never skips; accumulates pair statistics of the model outputs and the reference sampler states."""

    name = "ertacache-record"
    config_class = _RecorderConfig
    state_class = _RecorderState
    level = "model"
    scheduler_hook = True

    def __init__(self, config: _RecorderConfig) -> None:
        super().__init__(config)
        self.stats: dict[str, dict[str, dict[str, list[float]]]] = {}
        self.states_by_traj: list[list[torch.Tensor]] = []
        self.steps_seen = 0

    @property
    def threshold(self) -> float:
        return 0.0

    def can_reuse(self, state: BranchState) -> bool:
        return False

    def record(self, state: _RecorderState, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        if x_out.shape != x_in.shape:
            raise ValueError(
                f"ertacache needs the model output to have the input's shape (got {tuple(x_out.shape)} vs "
                f"{tuple(x_in.shape)})"
            )
        by_pair = self.stats.setdefault(step.branch, {})
        y = x_out.detach()
        for k, v in state.recent:
            key = pair_key(k, step.index)
            by_pair[key] = add_sums(by_pair.get(key), channel_sums(v, y))
        state.recent.append((step.index, y))
        while len(state.recent) > self.config.max_gap:
            state.recent.popleft()
        self.steps_seen = max(self.steps_seen, step.index + 1)

    def scheduler_step(
        self, session: Any, step: int, skipped: bool, sample: torch.Tensor, prev_sample: torch.Tensor
    ) -> torch.Tensor:
        traj = session.trajectories - 1
        while len(self.states_by_traj) <= traj:
            self.states_by_traj.append([])
        self.states_by_traj[traj].append(prev_sample.detach().clone())
        return prev_sample


class _PhiFitter:
    """Second pass: at each reused step, the least-squares ``phi`` that moves the cached trajectory closest to the
    full run's next state; the run continues with its own clipped ``phi``; pooled over runs at the end."""

    def __init__(self, reference: list[list[torch.Tensor]], num_steps: int, phi_range: tuple[float, float]) -> None:
        self.reference = reference
        self.phi_range = phi_range
        self.num = [0.0] * num_steps
        self.den = [0.0] * num_steps

    def __call__(self, session: Any, step: int, sample: torch.Tensor, prev_sample: torch.Tensor) -> float:
        traj = session.trajectories - 1
        if traj >= len(self.reference) or step >= len(self.reference[traj]):
            raise RuntimeError(_NOT_DETERMINISTIC)
        target = self.reference[traj][step].double() - sample.double()
        delta = prev_sample.double() - sample.double()
        if target.shape != delta.shape:
            raise RuntimeError(_NOT_DETERMINISTIC)
        num, den = float((target * delta).sum()), float((delta * delta).sum())
        self.num[step] += num
        self.den[step] += den
        return self.clip(num / den if den > 0 else 1.0)

    def clip(self, phi: float) -> float:
        lo, hi = self.phi_range
        return float(min(max(phi, lo), hi))

    def phis(self, skip: list[bool]) -> list[float]:
        return [
            round(self.clip(self.num[i] / self.den[i]), 6) if s and self.den[i] > 0 else 1.0
            for i, s in enumerate(skip)
        ]


def profile_ertacache(
    pipe_or_transformer: Any,
    run: Callable[[], Any],
    *,
    scheduler: Any = None,
    max_gap: int = 8,
    record_states: bool = True,
) -> tuple[dict[str, dict[str, dict[str, list[float]]]], list[list[torch.Tensor]], int]:
    """First pass: ``(pair statistics per branch, reference sampler states per run, number of steps)``.

    The reference states (needed to fit ``phi``) are recorded by wrapping the scheduler when ``record_states``.
    """
    _, pipe_scheduler = _resolve(pipe_or_transformer)
    recorder = _ErtaRecorder(_RecorderConfig(max_gap=max_gap))
    recorder.scheduler_hook = record_states
    enable_cache(pipe_or_transformer, recorder, scheduler=scheduler if scheduler is not None else pipe_scheduler)
    try:
        run()
    finally:
        disable_cache(pipe_or_transformer)
    if not recorder.stats:
        raise RuntimeError("run() made no call to the model: nothing to calibrate from")
    return recorder.stats, recorder.states_by_traj, recorder.steps_seen


def calibrate_ertacache(
    pipe_or_transformer: Any,
    run: Callable[[], Any],
    threshold: float,
    *,
    scheduler: Any = None,
    rectify: bool = True,
    adjust_timestep: bool = True,
    warmup_steps: int = 1,
    last_steps: int = 1,
    max_consecutive_skips: int | None = None,
    max_gap: int = 8,
    phi_range: tuple[float, float] = (0.5, 2.0),
) -> ErtaSchedule:
    """Build an ERTACache schedule from the full runs made by ``run()`` (deterministic; see the module docstring).

    ``threshold``: the largest profiled relative residual error a reused step may have; ``max_gap``: pairs
    ``(k, i)`` farther apart are not profiled (so at most ``max_gap - 1`` reuses in a row).
    """
    _, pipe_scheduler = _resolve(pipe_or_transformer)
    sched = scheduler if scheduler is not None else pipe_scheduler
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    stats, reference, n = profile_ertacache(
        pipe_or_transformer, run, scheduler=sched, max_gap=max_gap, record_states=adjust_timestep
    )
    schedule = build_schedule(
        stats, n, threshold, rectify=rectify, warmup_steps=warmup_steps, last_steps=last_steps,
        max_consecutive_skips=max_consecutive_skips,
    )  # fmt: skip
    runs = len(reference) if adjust_timestep else None
    schedule.meta.update(calibration_runs=runs, max_gap=max_gap, phi_range=list(phi_range))
    if adjust_timestep and any(schedule.skip):
        fitter = _PhiFitter(reference, n, phi_range)
        session = enable_cache(pipe_or_transformer, "ertacache", schedule=schedule, rectify=rectify, scheduler=sched)
        session.policy.phi_fitter = fitter
        try:
            run()
        finally:
            if get_session(pipe_or_transformer) is session:
                disable_cache(pipe_or_transformer)
        schedule.phi = fitter.phis(schedule.skip)
    logger.info(
        "ERTACache schedule (threshold %g): %s, %d/%d steps computed, phi %s",
        threshold, schedule.mask(), schedule.steps_computed, n, schedule.phi,
    )  # fmt: skip
    return schedule
