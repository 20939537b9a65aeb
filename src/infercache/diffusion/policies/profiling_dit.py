"""ProfilingDiT: foreground blocks always compute; background blocks reuse their residual between full steps.

Paper: "Model Reveals What to Cache: Profiling-Based Feature Reuse for Video Diffusion Models" (ICCV'25),
https://arxiv.org/abs/2504.03140 (code: GeekGuru123/ProfilingDiT, ``Wan2.1/wan/cache.py``,
``DitCache.forward_single_original``, the uniform step-wise branch that the released scripts run).

Rule (the released code's):

* steps ``< step_start`` (here ``warmup_steps``, or ``warmup_ratio``) compute every block;
* step ``s`` is a **full step** when ``(s - step_start) % step_interval == 0``: every block computes, and each
  cached span records its residual: an isolated background block ``b`` stores ``out_b - in_b``; a contiguous run
  ``[s..e]`` of background blocks stores one residual ``out_e - in_s`` (the code's ``out_e - out_{s-1}``);
* on the other steps (**partial steps**) foreground blocks compute; inside a cached span the blocks pass their
  input through and the span's last block adds the stored residual.

Blocks: ``background_blocks=[...]`` (cached), or ``foreground_blocks=[...]`` (every other block is cached), or
``profile=`` a :class:`~infercache.diffusion.profiling.BlockProfile` (or its JSON path / dict) from
:func:`~infercache.diffusion.profiling.profile_blocks`, the offline attention profiling.
``merge_spans=False`` caches every background block on its own (one residual per block).

Defaults follow the Wan2.1 script: ``step_start=6`` (``warmup_steps=6``), ``step_interval=6``, no forced last step,
no cap. Deviations: a span that starts at block 0 uses the block-0 input (the code would read a stale
``prev_hidden``); cond and uncond keep separate states (as the code's two ``DitCache`` instances do), and a CFG
batch takes a partial step only when both branches may. A "skipped" step in the stats is a *partial* step: the
foreground blocks still ran. ``step_interval=1`` or no background block never reuses (bit-identical output).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CacheConfig
from ..registry import register_policy
from .base import BranchState, CachePolicy, StepInfo


@dataclass
class ProfilingDiTConfig(CacheConfig):
    """ProfilingDiT options (see the module docstring); give exactly one of the three block sources."""

    background_blocks: Sequence[int] | None = None
    foreground_blocks: Sequence[int] | None = None
    profile: Any = None  # BlockProfile | dict | str | Path
    step_interval: int = 6
    merge_spans: bool = True
    warmup_steps: int = 6
    last_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step_interval < 1:
            raise ValueError(f"step_interval must be >= 1, got {self.step_interval}")
        given = [n for n in ("background_blocks", "foreground_blocks", "profile") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "profiling_dit needs exactly one of background_blocks=[...], foreground_blocks=[...] or "
                "profile=profile_blocks(model, run) (a BlockProfile, its dict or its JSON path); "
                f"got {', '.join(given) or 'none'}"
            )


@dataclass
class ProfilingDiTState(BranchState):
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)  # span index -> residual


def spans_of(blocks: Sequence[int], merge: bool = True) -> list[tuple[int, int]]:
    """Inclusive ranges of ``blocks`` (sorted, unique); contiguous blocks form one range when ``merge``."""
    spans: list[tuple[int, int]] = []
    for b in sorted(set(int(v) for v in blocks)):
        if merge and spans and spans[-1][1] == b - 1:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((b, b))
    return spans


@register_policy("profiling_dit")
class ProfilingDiTPolicy(CachePolicy):
    config_class = ProfilingDiTConfig
    state_class = ProfilingDiTState
    level = "partial"
    accumulate = False

    def setup(self, transformer: torch.nn.Module, blocks: torch.nn.ModuleList | None) -> None:
        n = len(blocks)
        cfg = self.config
        if cfg.profile is not None:
            from ..profiling import BlockProfile

            prof = cfg.profile
            if isinstance(prof, (str, Path)):
                prof = BlockProfile.load(prof)
            elif isinstance(prof, dict):
                prof = BlockProfile.from_dict(prof)
            if not isinstance(prof, BlockProfile):
                raise TypeError(f"profile must be a BlockProfile, its dict or a JSON path, got {type(prof).__name__}")
            if len(prof.preference) != n:
                raise ValueError(f"the profile has {len(prof.preference)} blocks but the model has {n}")
            background = list(prof.background_blocks)
        elif cfg.foreground_blocks is not None:
            _check_indices(cfg.foreground_blocks, n, "foreground_blocks")
            background = [b for b in range(n) if b not in set(cfg.foreground_blocks)]
        else:
            _check_indices(cfg.background_blocks, n, "background_blocks")
            background = list(cfg.background_blocks)
        self.background_blocks = sorted(set(background))
        self._spans = spans_of(self.background_blocks, cfg.merge_spans)

    @property
    def spans(self) -> list[tuple[int, int]]:
        return self._spans

    @property
    def threshold(self) -> float:
        return 0.5  # distance is 0 (partial step) or inf (full step)

    def distance(self, state: ProfilingDiTState, probe: Any, step: StepInfo) -> float:
        start = self.config.warmup(step.num_steps)
        return math.inf if (step.index - start) % self.config.step_interval == 0 else 0.0

    def can_reuse(self, state: ProfilingDiTState) -> bool:
        return bool(self._spans) and len(state.residuals) == len(self._spans)

    def reuse_span(self, state: ProfilingDiTState, span: int, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        return x + state.residuals[span]

    def record_span(
        self, state: ProfilingDiTState, span: int, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo
    ) -> None:
        state.residuals[span] = x_out - x_in

    def block_fraction(self, num_blocks: int) -> float:
        """Fraction of the blocks that still run on a partial step."""
        return 1.0 - len(self.background_blocks) / num_blocks


def _check_indices(blocks: Sequence[int], n: int, name: str) -> None:
    bad = [b for b in blocks if not 0 <= int(b) < n]
    if bad:
        raise ValueError(f"{name} {bad} out of range for a model with {n} blocks")
