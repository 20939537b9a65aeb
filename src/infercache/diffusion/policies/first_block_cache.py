"""First Block Cache (FBCache): the residual of the first block(s) decides whether the rest of the stack runs.

Origin: ParaAttention (https://github.com/chengzeyi/ParaAttention), "inspired by TeaCache"
(https://arxiv.org/abs/2411.19108); reference implementation ``diffusers/hooks/first_block_cache.py``.

Rule: run the head block(s); ``r0 = head_out - head_in``; ``d = mean|r0 - r0_prev| / mean|r0_prev|`` where
``r0_prev`` is the head residual of the *last computed* step (it is not updated on skipped steps); **not
accumulated**. Skip when ``d < threshold`` and return ``head_out + tail_residual`` (``tail_residual`` = stack output
minus head output at the last computed step).

Defaults follow diffusers: ``threshold=0.05``, one head block, no warm-up beyond the first step (nothing is cached
before it), no forced last step, no cap on consecutive skips. ``head_blocks > 1`` gives cache-dit's DBCache
``Fn`` (with ``Bn=0``). Thresholds are not comparable with the accumulating policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..blocks import rel_l1
from ..config import CacheConfig
from ..registry import register_policy
from .base import BranchState, CachePolicy, ProbeInput, StepInfo


@dataclass
class FirstBlockCacheConfig(CacheConfig):
    """FBCache options. ``threshold``: relative L1 change of the head residual; ``head_blocks``: blocks always run."""

    threshold: float = 0.05
    head_blocks: int = 1
    warmup_steps: int = 0
    last_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_blocks < 1:
            raise ValueError(f"head_blocks must be >= 1, got {self.head_blocks}")


@dataclass
class FirstBlockCacheState(BranchState):
    prev_r0: torch.Tensor | None = None
    tail_residual: torch.Tensor | None = None


@register_policy("first_block_cache")
class FirstBlockCachePolicy(CachePolicy):
    config_class = FirstBlockCacheConfig
    state_class = FirstBlockCacheState
    accumulate = False

    @property
    def head_blocks(self) -> int:
        return self.config.head_blocks

    def probe(self, state: FirstBlockCacheState, inp: ProbeInput, step: StepInfo) -> torch.Tensor:
        return (inp.x - inp.head_input).detach()

    def distance(self, state: FirstBlockCacheState, probe: torch.Tensor, step: StepInfo) -> float | None:
        return rel_l1(probe, state.prev_r0)

    def can_reuse(self, state: FirstBlockCacheState) -> bool:
        return state.prev_r0 is not None and state.tail_residual is not None

    def observe(self, state: FirstBlockCacheState, probe: Any, skipped: bool, step: StepInfo) -> None:
        if not skipped:
            state.prev_r0 = probe

    def reuse(self, state: FirstBlockCacheState, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        return x + state.tail_residual

    def record(self, state: FirstBlockCacheState, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        state.tail_residual = x_out - x_in
