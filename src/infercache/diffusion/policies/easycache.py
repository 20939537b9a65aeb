"""EasyCache: runtime-adaptive reuse of the model's transformation vector.

Paper: "Less is Enough: Training-Free Video Diffusion Acceleration via Runtime-Adaptive Caching",
https://arxiv.org/abs/2507.02860 (code: H-EmbodVis/EasyCache, ``EasyCache4Wan2.1/easycache_generate.py``).

Rule (whole model; the probe is the input latent, so it costs nothing):

* on a computed step: ``v = model(x)``; the *transformation rate* ``k = mean|v - v_prev| / mean|x - x_prev|``
  between consecutive computed steps; cache ``delta = v - x``;
* otherwise ``acc += k * mean|x_t - x_{t-1}| / mean|v_last|`` (the previous input is updated every step);
  skip while ``acc < threshold`` and return ``x_t + delta``.

Defaults follow the Wan2.1 script: ``threshold=0.05`` (README: 0.1 about 2x, 0.2 about 3x), the first 10 of 50
steps computed (here ``warmup_ratio=0.2`` so that it scales with the step count), the last step computed, no cap
on consecutive skips. Deviation: the reference lets the uncond call follow the cond decision; here every CFG
branch has its own state, and a CFG batch skips only when both halves may skip.
Needs an output with the input's shape (a velocity / noise prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import CacheConfig
from ..registry import register_policy
from .base import BranchState, CachePolicy, ProbeInput, StepInfo


@dataclass
class EasyCacheConfig(CacheConfig):
    """EasyCache options (see the module docstring). ``threshold``: accumulated predicted output change."""

    threshold: float = 0.05
    warmup_steps: int = 1
    warmup_ratio: float | None = 0.2
    last_steps: int = 1


@dataclass
class EasyCacheState(BranchState):
    prev_x: torch.Tensor | None = None
    last_x: torch.Tensor | None = None
    last_v: torch.Tensor | None = None
    k: float | None = None
    delta: torch.Tensor | None = None


@register_policy("easycache")
class EasyCachePolicy(CachePolicy):
    config_class = EasyCacheConfig
    state_class = EasyCacheState
    level = "model"

    def probe(self, state: EasyCacheState, inp: ProbeInput, step: StepInfo) -> torch.Tensor:
        return inp.x.detach()

    def distance(self, state: EasyCacheState, probe: torch.Tensor, step: StepInfo) -> float | None:
        if state.k is None or state.prev_x is None or state.last_v is None:
            return None
        change = (probe.float() - state.prev_x.float()).abs().mean()
        return float(state.k * change / (state.last_v.float().abs().mean() + 1e-12))

    def can_reuse(self, state: EasyCacheState) -> bool:
        return state.delta is not None

    def observe(self, state: EasyCacheState, probe: Any, skipped: bool, step: StepInfo) -> None:
        state.prev_x = probe

    def reuse(self, state: EasyCacheState, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        return x + state.delta

    def record(self, state: EasyCacheState, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        if x_out.shape != x_in.shape:
            raise ValueError(
                f"easycache needs the model output to have the input's shape (got {tuple(x_out.shape)} vs "
                f"{tuple(x_in.shape)}), e.g. no learned-sigma channels"
            )
        if state.last_x is not None:
            dx = (x_in.float() - state.last_x.float()).abs().mean()
            dv = (x_out.float() - state.last_v.float()).abs().mean()
            state.k = float(dv / dx) if dx > 0 else None
        state.delta = x_out - x_in
        state.last_x, state.last_v = x_in, x_out
