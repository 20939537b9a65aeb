"""The config every caching policy shares: the skeleton's guards and how the cache binds to a model.

Each policy subclasses :class:`CacheConfig` with its own fields and its own defaults (see its module).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal


@dataclass
class CacheConfig:
    """Guards and binding options common to all policies.

    Args:
        warmup_steps: the first ``warmup_steps`` denoising steps are always computed.
        warmup_ratio: also compute the first ``round(warmup_ratio * num_steps)`` steps (the larger of the two
            guards wins); needs the number of steps (see ``num_inference_steps``).
        last_steps: the last ``last_steps`` steps are always computed (needs the number of steps).
        max_consecutive_skips: never skip more than this many steps in a row (``None``: no cap).
        num_inference_steps: steps per pipeline call. ``None``: taken from ``begin_call``, from the
            pipeline's scheduler, or unknown (then ``warmup_ratio`` and ``last_steps`` cannot apply).
        cfg: how classifier-free guidance branches get separate states. ``"auto"``: a batch whose two halves
            have identical latents is split into ``cond`` / ``uncond`` halves, and repeated calls at the same
            timestep are separate branches (``cond`` first). ``"batch"``: always split even batches.
            ``"none"``: never split a batch (repeated calls still get separate states).
        blocks: attribute name of the transformer's block list (``None``: the first of ``transformer_blocks``,
            ``blocks``, ``layers``, ``single_transformer_blocks``).
    """

    warmup_steps: int = 1
    warmup_ratio: float | None = None
    last_steps: int = 1
    max_consecutive_skips: int | None = None
    num_inference_steps: int | None = None
    cfg: Literal["auto", "batch", "none"] = "auto"
    blocks: str | None = None

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "last_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.max_consecutive_skips is not None and self.max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0 or None, got {self.max_consecutive_skips}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.cfg not in ("auto", "batch", "none"):
            raise ValueError(f"cfg must be 'auto', 'batch' or 'none', got {self.cfg!r}")
        threshold = getattr(self, "threshold", None)
        if threshold is not None and threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")

    def warmup(self, num_steps: int | None) -> int:
        """Number of leading steps that are always computed."""
        n = self.warmup_steps
        if self.warmup_ratio is not None and num_steps is not None:
            n = max(n, int(self.warmup_ratio * num_steps + 0.5))
        return n

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
