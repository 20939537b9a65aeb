"""Where a denoiser call sits in a sampling loop: step index, CFG branch, and when a new trajectory starts.

A hook only sees ``transformer(hidden_states, timestep, ...)`` calls. Rules, in order:

* a **new trajectory** (state reset) starts when ``begin_call`` was called, when the timestep goes *up*, when
  the latent's shape / dtype / device changes, or when more steps arrive than the known number of steps;
* a call with the **same timestep** as the previous one is another branch of the same step (CFG run as two
  calls: ``cond`` first, then ``uncond``);
* a call with a **lower timestep** is the next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Position:
    """The tracker's answer for one call."""

    step: int
    slot: int  # 0 for the first call at this step, 1 for the second (CFG as separate calls), ...
    new_trajectory: bool


class TrajectoryTracker:
    def __init__(self) -> None:
        self.reset()
        self.num_steps: int | None = None

    def reset(self) -> None:
        self.last_t: float | None = None
        self.signature: tuple[Any, ...] | None = None
        self.step = -1
        self.slot = 0
        self.slots_per_step: int | None = None
        self.pending_new = False

    def request_new(self) -> None:
        """Force the next call to start a new trajectory (``begin_call``)."""
        self.pending_new = True

    def observe(self, t: float, signature: tuple[Any, ...]) -> Position:
        new = self.pending_new or self.last_t is None or signature != self.signature or t > self.last_t
        if not new and t < self.last_t and self.num_steps is not None and self.step + 1 >= self.num_steps:
            new = True  # more steps than this trajectory has: a new call that did not start higher
        if not new and t == self.last_t and self.num_steps is not None and self.step == self.num_steps - 1:
            # a repeated timestep after the final step's branches are all done: a new one-step call
            new = self.slots_per_step is not None and self.slot + 1 >= self.slots_per_step
        if new:
            self.pending_new = False
            self.step, self.slot, self.slots_per_step = 0, 0, 1
        elif t == self.last_t:
            self.slot += 1
            if self.step == 0:
                self.slots_per_step = self.slot + 1
        else:
            self.step += 1
            self.slot = 0
        self.last_t = t
        self.signature = signature
        return Position(self.step, self.slot, new)


def timestep_value(timestep: Any) -> float:
    """A scalar for a timestep given as a number or a (batched) tensor (its first element)."""
    if timestep is None:
        raise ValueError(
            "infercache diffusion caches need the denoiser's `timestep` argument to track denoising steps; "
            "the transformer was called without one"
        )
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


def is_cfg_batch(hidden_states: torch.Tensor, timestep: Any) -> bool:
    """True when the batch looks like ``cat([x, x])`` (classifier-free guidance in one call)."""
    n = hidden_states.shape[0]
    if n < 2 or n % 2:
        return False
    if isinstance(timestep, torch.Tensor) and timestep.ndim >= 1 and timestep.shape[0] == n:
        if not torch.equal(timestep[: n // 2], timestep[n // 2 :]):
            return False
    return torch.equal(hidden_states[: n // 2], hidden_states[n // 2 :])


def branch_names(slot: int, split: bool) -> list[str]:
    """State keys of the branches in one call."""
    base = ["cond", "uncond"] if slot == 0 else [f"cond.{slot}", f"uncond.{slot}"]
    if split:
        return base
    return ["cond"] if slot == 0 else ["uncond"] if slot == 1 else [f"call{slot}"]
