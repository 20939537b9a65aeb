"""TaylorSeer: forecast the skipped features with a Taylor series built from the last computed steps.

Paper: "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers",
https://arxiv.org/abs/2503.06923 (reference implementation ``diffusers/hooks/taylorseer_cache.py``).

Schedule (fixed, no probe; diffusers' rule): after ``warmup_steps`` computed steps, step ``s`` is computed when
``(s - warmup_steps - 1) % cache_interval == 0``. On a computed step the factors are refreshed by finite
differences, ``f[0] = F``, ``f[j+1] = (f[j] - f_prev[j]) / (s - s_last)`` for ``j < max_order``; on the other steps
``F(s) = sum_j f[j] (s - s_last)^j / j!``.

What is forecast here is the **block-stack residual** ``F = stack_out - stack_in`` (the output is
``stack_in + F(s)``), not each attention / MLP output as in the paper and diffusers; cache-dit's TaylorSeer
calibrator works on the same stream. Defaults follow diffusers: ``cache_interval=5``, ``max_order=1``,
``warmup_steps=3`` (``disable_cache_before_step``), no forced last step. ``cache_interval=1`` never skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import CacheConfig
from ..registry import register_policy
from .base import BranchState, CachePolicy, StepInfo


@dataclass
class TaylorSeerConfig(CacheConfig):
    """TaylorSeer options: ``cache_interval`` (one full step every N), ``max_order`` of the Taylor series."""

    cache_interval: int = 5
    max_order: int = 1
    warmup_steps: int = 3
    last_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache_interval < 1:
            raise ValueError(f"cache_interval must be >= 1, got {self.cache_interval}")
        if self.max_order < 0:
            raise ValueError(f"max_order must be >= 0, got {self.max_order}")


@dataclass
class TaylorSeerState(BranchState):
    factors: list[torch.Tensor] = field(default_factory=list)
    last_step: int | None = None


@register_policy("taylorseer")
class TaylorSeerPolicy(CachePolicy):
    config_class = TaylorSeerConfig
    state_class = TaylorSeerState
    accumulate = False

    @property
    def threshold(self) -> float:
        return 0.5  # distance is 0 (forecast) or inf (compute)

    def distance(self, state: TaylorSeerState, probe: Any, step: StepInfo) -> float:
        k = (step.index - self.config.warmup(step.num_steps) - 1) % self.config.cache_interval
        return math.inf if k == 0 else 0.0

    def can_reuse(self, state: TaylorSeerState) -> bool:
        return bool(state.factors)

    def reuse(self, state: TaylorSeerState, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        dt = step.index - state.last_step
        out = state.factors[0]
        for j in range(1, len(state.factors)):
            out = out + state.factors[j] * (dt**j / math.factorial(j))
        return x + out

    def record(self, state: TaylorSeerState, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        new = [x_out - x_in]
        if state.factors and state.last_step is not None and step.index > state.last_step:
            dt = step.index - state.last_step
            for j in range(min(self.config.max_order, len(state.factors))):
                new.append((new[j] - state.factors[j]) / dt)
        state.factors, state.last_step = new, step.index
