"""The prompt state every mode hands back to :func:`infercache.reuse.generate`: first logits, cache, accounting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .decode import StepFn


@dataclass
class PromptState:
    """After the prompt pass: ``logits`` of the first new token, the ``cache`` to decode from (next token at
    ``next_position``, decoded with ``step``), token accounting, store counters, and ``write`` (store writes, run
    after the first token so they stay out of the time to first token; returns the number of blobs written)."""

    logits: torch.Tensor
    cache: Any
    next_position: int
    step: StepFn
    reused: int
    recomputed: int
    fresh: int
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    read_s: float = 0.0
    layer_rows: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    write: Callable[[], int] | None = None
