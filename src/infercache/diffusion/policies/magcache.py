"""MagCache: skip while the accumulated error predicted by calibrated residual-magnitude ratios stays small.

Paper: "MagCache: Fast Video Generation with Magnitude-Aware Cache", https://arxiv.org/abs/2506.09045
(code: Zehong-Ma/MagCache; reference implementation ``diffusers/hooks/mag_cache.py``).

Calibration (once per model and scheduler, :func:`infercache.diffusion.calibrate_magcache`): on full runs,
``gamma_t = mean_tokens(||r_t|| / ||r_{t-1}||)`` with ``r`` the block-stack residual. At run time, after the
retention steps: ``ratio *= gamma_t; acc += |1 - ratio|``; skip while ``acc < threshold`` and at most ``K``
steps in a row, returning ``stack_in + r_last`` (the last computed residual, unscaled); a compute resets
``ratio = 1, acc = 0``.

Defaults follow diffusers: ``threshold=0.06``, ``max_consecutive_skips=K=3``, ``warmup_ratio=0.2`` (retention
ratio), no forced last step. Ratios of another length are resampled by nearest neighbour (as diffusers does).
Deviation: the threshold test is strict (``acc < threshold``; diffusers uses ``<=``) so that ``threshold=0``
never skips. Ratios may be one list for every branch or a dict ``{"cond": [...], "uncond": [...]}``.
"""

from __future__ import annotations

import os

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import CacheConfig
from ..registry import register_policy
from .base import BranchState, CachePolicy, StepInfo

#: Calibrated ratios shipped with the library (name -> ratios, or per-branch ratios).
KNOWN_MAG_RATIOS: dict[str, Any] = {
    # dit-digits, 20 steps, CFG 2.0 (cond / uncond), from scripts/diffusion/bench_digits.py on held-out seeds.
    "dit-digits": {
        "cond": [
            1.0,
            1.18461,
            0.95758,
            0.94841,
            0.95847,
            0.94206,
            0.95634,
            0.95695,
            0.96277,
            0.96729,
            0.96176,
            0.95586,
            0.97572,
            0.97582,
            0.97359,
            0.99088,
            0.99026,
            1.00501,
            1.01456,
            0.95552,
        ],
        "uncond": [
            1.0,
            1.21505,
            0.9453,
            0.93492,
            0.95195,
            0.92455,
            0.95,
            0.94566,
            0.96851,
            0.96224,
            0.9624,
            0.96268,
            0.97922,
            0.98385,
            0.97249,
            0.99515,
            0.9958,
            1.00688,
            1.01963,
            0.93444,
        ],
    },
}


@dataclass
class MagCacheConfig(CacheConfig):
    """MagCache options; ``mag_ratios`` is required (a list, a per-branch dict, or a name in ``KNOWN_MAG_RATIOS``)."""

    threshold: float = 0.06
    mag_ratios: Sequence[float] | dict[str, Sequence[float]] | str | None = None
    warmup_steps: int = 0
    warmup_ratio: float | None = 0.2
    last_steps: int = 0
    max_consecutive_skips: int | None = 3


@dataclass
class MagCacheState(BranchState):
    ratio: float = 1.0
    residual: torch.Tensor | None = None


def nearest_interp(ratios: Sequence[float], n: int) -> list[float]:
    """Resample ``ratios`` to length ``n`` by nearest neighbour (diffusers' ``nearest_interp``)."""
    m = len(ratios)
    if n == m:
        return list(ratios)
    if n == 1:
        return [ratios[-1]]
    scale = (m - 1) / (n - 1)
    return [float(ratios[int(round(i * scale))]) for i in range(n)]


@register_policy("magcache")
class MagCachePolicy(CachePolicy):
    config_class = MagCacheConfig
    state_class = MagCacheState

    def setup(self, transformer: torch.nn.Module, blocks: torch.nn.ModuleList | None) -> None:
        ratios = self.config.mag_ratios
        if isinstance(ratios, (str, os.PathLike)) and str(ratios).endswith(".json"):
            from ..calibration import load_calibration

            ratios = load_calibration(ratios, "magcache")
        if isinstance(ratios, str):
            if ratios not in KNOWN_MAG_RATIOS:
                raise ValueError(f"no shipped MagCache ratios named {ratios!r}; known: {', '.join(KNOWN_MAG_RATIOS)}")
            ratios = KNOWN_MAG_RATIOS[ratios]
        if ratios is None or len(ratios) == 0:
            raise ValueError(
                "magcache needs calibrated magnitude ratios: mag_ratios=infercache.diffusion.calibrate_magcache("
                "model, run) on a few full runs, or a shipped name such as 'dit-digits'"
            )
        self._ratios = ratios

    def _ratio(self, step: StepInfo) -> float:
        ratios = self._ratios
        if isinstance(ratios, dict):
            ratios = ratios.get(step.branch, ratios.get("cond", next(iter(ratios.values()))))
        if step.num_steps is not None and len(ratios) != step.num_steps:
            ratios = nearest_interp(ratios, step.num_steps)
        return float(ratios[step.index]) if step.index < len(ratios) else 1.0

    def distance(self, state: MagCacheState, probe: Any, step: StepInfo) -> float:
        pending = state.ratio * self._ratio(step)
        state.pending["ratio"] = pending
        return abs(1.0 - pending)

    def on_commit(self, state: MagCacheState, skipped: bool) -> None:
        state.ratio = state.pending.pop("ratio", state.ratio) if skipped else 1.0
        state.pending.clear()

    def can_reuse(self, state: MagCacheState) -> bool:
        return state.residual is not None

    def reuse(self, state: MagCacheState, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        return x + state.residual

    def record(self, state: MagCacheState, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        state.residual = x_out - x_in
