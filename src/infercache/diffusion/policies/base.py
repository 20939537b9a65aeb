"""The shared skeleton every policy plugs into: probe -> distance -> accumulator vs threshold -> guards -> reuse.

A policy only says *what* to probe, *how far* the current step is from the cached one, and *how* to reuse the
cache; :meth:`CachePolicy.propose` applies the guards and the threshold identically for all of them:

1. warm-up: steps ``< config.warmup(num_steps)`` are computed;
2. last steps: steps ``>= num_steps - config.last_steps`` are computed;
3. nothing cached yet (``can_reuse`` false): computed;
4. ``max_consecutive_skips`` skips in a row: computed;
5. otherwise ``d = distance(...)``; ``acc = state.acc + d`` (or ``d`` for non-accumulating policies);
   skip iff ``acc < threshold`` (strict, so ``threshold=0`` never skips). A compute resets ``acc`` to 0.

``level = "blocks"``: the decision is taken when the hidden states enter the block stack (after
``head_blocks`` always-computed blocks) and the reuse replaces the rest of the stack; embedding and output
head always run. ``level = "model"``: the decision replaces the whole transformer call. ``level = "partial"``
(ProfilingDiT): the decision is taken at block 0; on a skip only the policy's cached *spans* of blocks
(``spans``, contiguous block ranges) reuse their recorded residual, and every other block computes.

Policies that also act on the sampler (ERTACache's timestep adjustment) set ``scheduler_hook = True``: the cache
then wraps the scheduler's ``step`` (see ``hooks.py``) and calls :meth:`CachePolicy.scheduler_step` after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..config import CacheConfig


@dataclass
class StepInfo:
    """Where the current call is: step index, number of steps (if known), timestep, branch name."""

    index: int
    num_steps: int | None
    timestep: float
    branch: str


@dataclass
class BranchState:
    """Skeleton state of one branch (cond / uncond) in one trajectory; policies subclass it."""

    acc: float = 0.0
    consecutive: int = 0
    skips: int = 0
    pending: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeInput:
    """What a probe may look at (already sliced to one branch).

    ``x`` is the stack input (``level="blocks"``) or the model input latent (``level="model"``);
    ``head_input`` the input of block 0 when ``head_blocks > 0``; ``block``/``args``/``kwargs`` the entry block's
    call (block 0 when ``head_blocks == 0``); ``transformer`` the hooked model.
    """

    x: torch.Tensor
    head_input: torch.Tensor | None = None
    block: torch.nn.Module | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    transformer: torch.nn.Module | None = None


class CachePolicy:
    """Base class of the policies; subclasses are registered with ``@register_policy(name)``."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[CacheConfig]] = CacheConfig
    state_class: ClassVar[type[BranchState]] = BranchState
    level: ClassVar[Literal["model", "blocks", "partial"]] = "blocks"
    accumulate: ClassVar[bool] = True
    #: Whether the policy needs the scheduler's ``step`` wrapped (``scheduler_step`` is then called); a policy may
    #: set it per instance.
    scheduler_hook: ClassVar[bool] = False

    def __init__(self, config: CacheConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    # -- knobs -------------------------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.config.threshold)

    @property
    def head_blocks(self) -> int:
        """Blocks always computed before the decision (``level="blocks"`` only)."""
        return 0

    def setup(self, transformer: torch.nn.Module, blocks: torch.nn.ModuleList) -> None:
        """Called once by ``enable_cache`` (validate the model, resolve per-model constants)."""

    # -- the skeleton's plug points -------------------------------------------------------------------------
    def probe(self, state: BranchState, inp: ProbeInput, step: StepInfo) -> Any:
        """The cheap quantity measured at every step (default: none)."""
        return None

    def distance(self, state: BranchState, probe: Any, step: StepInfo) -> float | None:
        """Estimated change since the cached step (``None``: cannot tell, compute)."""
        raise NotImplementedError

    def can_reuse(self, state: BranchState) -> bool:
        """Whether something is cached that ``reuse`` can use."""
        raise NotImplementedError

    def observe(self, state: BranchState, probe: Any, skipped: bool, step: StepInfo) -> None:
        """Called after every decision (update the previous probe, ...)."""

    def reuse(self, state: BranchState, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """Output of the skipped part, from its input ``x``."""
        raise NotImplementedError

    def record(self, state: BranchState, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        """Called after a computed step with the input and output of the cached part."""
        raise NotImplementedError

    def on_model_output(self, state: BranchState, x: torch.Tensor, out: torch.Tensor, step: StepInfo) -> None:
        """Called with the model input and output after every transformer call (``level="blocks"``)."""

    # -- level="partial": cached spans of blocks -------------------------------------------------------------
    @property
    def spans(self) -> list[tuple[int, int]]:
        """Inclusive ``(first, last)`` block ranges whose residual is reused on a skipped step."""
        return []

    def reuse_span(self, state: BranchState, span: int, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """Output of cached span ``span`` (an index into ``spans``) from its input ``x``."""
        raise NotImplementedError

    def record_span(
        self, state: BranchState, span: int, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo
    ) -> None:
        """Called on a computed step with the input and output of span ``span``."""
        raise NotImplementedError

    # -- scheduler_hook=True: after the sampler's step -------------------------------------------------------
    def scheduler_step(
        self, session: Any, step: int, skipped: bool, sample: torch.Tensor, prev_sample: torch.Tensor
    ) -> torch.Tensor:
        """The sample the scheduler step returns (default: ``prev_sample`` unchanged).

        ``step`` / ``skipped``: the step index and the decision of the model call(s) that produced the model
        output; ``sample``: the scheduler's input latent; ``prev_sample``: what the original step computed.
        """
        return prev_sample

    # -- the shared gate -------------------------------------------------------------------------------------
    def propose(self, state: BranchState, probe: Any, step: StepInfo) -> tuple[bool, str, float]:
        """Guards, then the accumulator against the threshold: ``(skip, reason, new_acc)``."""
        cfg = self.config
        n = step.num_steps
        if step.index < cfg.warmup(n):
            return False, "warmup", 0.0
        if n is not None and step.index >= n - cfg.last_steps:
            return False, "last", 0.0
        if not self.can_reuse(state):
            return False, "empty", 0.0
        if cfg.max_consecutive_skips is not None and state.consecutive >= cfg.max_consecutive_skips:
            return False, "max-skips", 0.0
        d = self.distance(state, probe, step)
        if d is None:
            return False, "no-estimate", 0.0
        acc = state.acc + d if self.accumulate else d
        if acc < self.threshold:
            return True, "skip", acc
        return False, "threshold", 0.0

    def commit(self, state: BranchState, skipped: bool, acc: float) -> None:
        """Apply the final decision to the skeleton state (``acc`` from ``propose``)."""
        if skipped:
            state.acc = acc
            state.consecutive += 1
            state.skips += 1
        else:
            state.acc = 0.0
            state.consecutive = 0
        self.on_commit(state, skipped)

    def on_commit(self, state: BranchState, skipped: bool) -> None:
        """Policy hook after ``commit`` (e.g. MagCache keeps or drops its pending ratio)."""
