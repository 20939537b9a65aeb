"""``streaming_llm``: attention sinks + a recent window, keys re-positioned inside the cache.

StreamingLLM, Xiao et al. 2023, https://arxiv.org/abs/2309.17453 (code: mit-han-lab/streaming-llm,
``StartRecentKVCache``). Before new tokens arrive the cache keeps the first ``sinks`` entries (4, the authors'
``start_size``) and the most recent ``budget - sinks - incoming`` ones (``evict_for_space``); keys are held
before RoPE and rotated at their index within the cache, so positions stay below ``budget``. ``sinks=0`` is the
plain sliding window ("window attention" in the paper), the baseline that collapses once the first tokens leave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..entries import Entries
from .base import StreamPolicy


@dataclass
class StreamingLLM(StreamPolicy):
    """Sinks + recent window (default 4 sinks; the window is the rest of the budget)."""

    sinks: int = 4
    name: ClassVar[str] = "streaming_llm"
    evicts_oldest: ClassVar[bool] = True

    def select(self, entries: Entries, incoming: int, modality: int) -> torch.Tensor | None:
        n = len(entries)
        if n + incoming <= self.budget:
            return None
        s = min(self.sinks, n)
        recent = max(self.budget - incoming - s, 0)
        return torch.cat([torch.arange(s), torch.arange(max(s, n - recent), n)])
