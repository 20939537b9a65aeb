"""One enabled cache: the policy, the per-branch states of the current trajectory, and the stats history."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocks import first_tensor, slice_batch, wrap_like
from .policies.base import BranchState, CachePolicy, ProbeInput, StepInfo
from .stats import CallStats
from .tracker import TrajectoryTracker, branch_names, is_cfg_batch, timestep_value

logger = logging.getLogger(__name__)


@dataclass
class Frame:
    """One transformer call in flight."""

    step: int
    num_steps: int | None
    timestep: float
    batch: int
    branches: list[tuple[str, slice | None]]
    decided: bool = False
    skipping: bool = False
    stack_input: torch.Tensor | None = None
    head_input: torch.Tensor | None = None
    span_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # level="partial"

    def info(self, branch: str) -> StepInfo:
        return StepInfo(self.step, self.num_steps, self.timestep, branch)


class CacheSession:
    """State of one cache enabled on one transformer (returned by ``enable_cache``)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        policy: CachePolicy,
        blocks: torch.nn.ModuleList | None,
        scheduler: Any = None,
        history: int = 64,
    ) -> None:
        self.transformer = transformer
        self.policy = policy
        self.blocks = blocks
        self.scheduler = scheduler
        self.tracker = TrajectoryTracker()
        self.states: dict[str, BranchState] = {}
        self.history: deque[CallStats] = deque(maxlen=history)
        self.frame: Frame | None = None
        self.num_steps_hint: int | None = None
        self._template: Any = None
        #: Trajectories started since the cache was enabled (the index of the current one is ``trajectories - 1``).
        self.trajectories = 0
        #: ``(step, skipped)`` of the latest decision, consumed by the scheduler hook.
        self.last_decision: tuple[int, bool] | None = None

    # -- trajectory bookkeeping ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop all cached tensors and restart step tracking (the next call starts a new trajectory)."""
        self.states.clear()
        self.tracker.reset()
        self._template = None
        self.last_decision = None

    def begin_call(self, num_inference_steps: int | None = None) -> None:
        self.tracker.request_new()
        self.num_steps_hint = num_inference_steps

    def _resolve_num_steps(self) -> int | None:
        if self.policy.config.num_inference_steps is not None:
            return self.policy.config.num_inference_steps
        if self.num_steps_hint is not None:
            return self.num_steps_hint
        sched = self.scheduler
        if sched is not None:
            n = getattr(sched, "num_inference_steps", None)
            if n:
                return int(n)
            ts = getattr(sched, "timesteps", None)
            if ts is not None and len(ts):
                return len(ts)
        return None

    def _new_trajectory(self) -> None:
        self.states.clear()
        self._template = None
        self.trajectories += 1
        n = self._resolve_num_steps()
        self.num_steps_hint = None
        self.tracker.num_steps = n
        self.history.append(CallStats(self.policy.name, n))
        cfg = self.policy.config
        if n is None and (cfg.last_steps or cfg.warmup_ratio):
            logger.warning(
                "%s: number of inference steps unknown, so last_steps / warmup_ratio guards are off; pass "
                "num_inference_steps=..., a scheduler=..., or call begin_call(model, num_inference_steps)",
                self.policy.name,
            )

    def begin(self, hidden_states: torch.Tensor, timestep: Any) -> Frame:
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError("infercache diffusion caches need `hidden_states` to be a tensor")
        t = timestep_value(timestep)
        sig = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device)
        pos = self.tracker.observe(t, sig)
        if pos.new_trajectory:
            self._new_trajectory()
        n = hidden_states.shape[0]
        mode = self.policy.config.cfg
        split = (mode == "batch" and n % 2 == 0) or (mode == "auto" and is_cfg_batch(hidden_states, timestep))
        names = branch_names(pos.slot, split)
        branches: list[tuple[str, slice | None]] = (
            [(names[0], slice(0, n // 2)), (names[1], slice(n // 2, n))] if split else [(names[0], None)]
        )
        return Frame(pos.step, self.tracker.num_steps, t, n, branches)

    def state(self, branch: str) -> BranchState:
        if branch not in self.states:
            self.states[branch] = self.policy.state_class()
        return self.states[branch]

    @property
    def stats(self) -> CallStats | None:
        return self.history[-1] if self.history else None

    # -- the decision, shared by both levels ------------------------------------------------------------------
    def decide(self, frame: Frame, make_input: Callable[[slice | None], ProbeInput]) -> bool:
        """Run probe + gate for every branch; skip only if every branch may skip (one batched forward)."""
        policy = self.policy
        proposals = []
        for name, sl in frame.branches:
            st, info = self.state(name), frame.info(name)
            probe = policy.probe(st, make_input(sl), info)
            skip, reason, acc = policy.propose(st, probe, info)
            proposals.append((name, st, info, probe, skip, reason, acc))
        skip_all = all(p[4] for p in proposals)
        stats = self.history[-1]
        for name, st, info, probe, skip, reason, acc in proposals:
            policy.commit(st, skip_all, acc)
            policy.observe(st, probe, skip_all, info)
            stats.add(name, skip_all, reason if skip == skip_all else "cfg-sync")
        frame.decided = True
        frame.skipping = skip_all
        self.last_decision = (frame.step, skip_all)
        return skip_all

    def reuse_all(self, frame: Frame, x: torch.Tensor) -> torch.Tensor:
        parts = [
            self.policy.reuse(self.states[name], slice_batch(x, sl, frame.batch), frame.info(name))
            for name, sl in frame.branches
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def record_all(self, frame: Frame, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        for name, sl in frame.branches:
            self.policy.record(
                self.states[name],
                slice_batch(x_in, sl, frame.batch).detach(),
                slice_batch(x_out, sl, frame.batch).detach(),
                frame.info(name),
            )

    # -- partial level (ProfilingDiT): one span of cached blocks at a time -----------------------------------------
    def reuse_span_all(self, frame: Frame, span: int, x: torch.Tensor) -> torch.Tensor:
        parts = [
            self.policy.reuse_span(self.states[name], span, slice_batch(x, sl, frame.batch), frame.info(name))
            for name, sl in frame.branches
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def record_span_all(self, frame: Frame, span: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        for name, sl in frame.branches:
            self.policy.record_span(
                self.states[name],
                span,
                slice_batch(x_in, sl, frame.batch).detach(),
                slice_batch(x_out, sl, frame.batch).detach(),
                frame.info(name),
            )

    # -- scheduler hook (ERTACache): called by the wrapped ``scheduler.step`` --------------------------------------
    def scheduler_step(self, sample: torch.Tensor, prev_sample: torch.Tensor) -> torch.Tensor:
        decision, self.last_decision = self.last_decision, None
        if decision is None:  # no model call since the last step (or a reset): nothing to adjust
            return prev_sample
        return self.policy.scheduler_step(self, decision[0], decision[1], sample, prev_sample)

    # -- model level (EasyCache): the whole transformer call is replaced on a skip -------------------------------
    def run_model_level(self, frame: Frame, x: torch.Tensor, call: Callable[[], Any], return_dict: Any) -> Any:
        skip = self.decide(
            frame, lambda sl: ProbeInput(x=slice_batch(x, sl, frame.batch), transformer=self.transformer)
        )
        if skip:
            out = self.reuse_all(frame, x)
            if return_dict is False:
                return (out,)
            return wrap_like(self._template, out) if self._template is not None else out
        output = call()
        self._template = output if not isinstance(output, torch.Tensor) else None
        self.record_all(frame, x, first_tensor(output))
        return output

    def after_model_call(self, frame: Frame, x: torch.Tensor, output: Any) -> None:
        out = first_tensor(output)
        for name, sl in frame.branches:
            if name in self.states:
                self.policy.on_model_output(
                    self.states[name],
                    slice_batch(x, sl, frame.batch),
                    slice_batch(out, sl, frame.batch).detach(),
                    frame.info(name),
                )
