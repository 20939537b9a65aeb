"""``streaming_vlm``: separate budgets per token type, contiguous (3-D for M-RoPE) positions.

StreamingVLM, Xu et al. 2025, https://arxiv.org/abs/2510.09608 (code: mit-han-lab/streaming-vlm,
``prune_id_and_kv_cache``). The authors keep the system prompt (sinks), the vision tokens of the last 16 one-second
chunks, the text of the last 16 rounds, and of the older text its first 512 and last 512 tokens; positions are
re-assigned contiguously ("shrink" mode). Here every part is a token budget inside ``budget``:

* ``sinks`` (4): the first entries, whatever their type;
* ``vision`` (the rest of the budget, about half): the newest whole vision chunks (a frame is one chunk) that fit;
* ``text_recent`` (``budget // 4``): the newest text tokens from the oldest kept frame on (the text that goes with
  the vision window; all recent text in a text-only stream);
* ``text_sink`` / ``text_window`` (``budget // 8`` each): of the older text, its first and its last tokens.

Nothing is evicted while everything fits; once the budget would be exceeded each type is cut to its own budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..entries import TEXT, VISION, Entries
from ..errors import StreamBudgetError
from .base import StreamPolicy

if TYPE_CHECKING:  # pragma: no cover
    from ..stream import Stream


@dataclass
class StreamingVLM(StreamPolicy):
    """Typed budgets: sinks, vision window, recent text, older text as sink + window."""

    sinks: int = 4
    vision: int | None = None
    text_recent: int | None = None
    text_sink: int | None = None
    text_window: int | None = None
    name: ClassVar[str] = "streaming_vlm"

    def setup(self, budget: int, stream: "Stream") -> None:
        super().setup(budget, stream)
        if self.text_sink is None:
            self.text_sink = budget // 8
        if self.text_window is None:
            self.text_window = budget // 8
        if self.text_recent is None:
            self.text_recent = budget // 4
        if self.vision is None:
            self.vision = budget - self.sinks - self.text_recent - self.text_sink - self.text_window
        parts = {"vision": self.vision, "text_recent": self.text_recent, "text_sink": self.text_sink,
                 "text_window": self.text_window}
        for name, value in parts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StreamBudgetError(f"streaming_vlm: {name} must be an int >= 0, got {value!r}")
        if self.text_recent < 1:
            raise StreamBudgetError("streaming_vlm: text_recent must be >= 1 (new text has to fit somewhere)")
        total = self.sinks + sum(parts.values())
        if total > budget:
            raise StreamBudgetError(
                f"streaming_vlm: sinks + vision + text_recent + text_sink + text_window = {total} exceeds the "
                f"budget ({budget}); lower a part or raise the budget"
            )

    def max_chunk(self, modality: int) -> int:
        return self.vision if modality == VISION else self.text_recent

    def keep_mask(self, modality: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Which of ``N`` entries (stream order) the typed budgets keep."""
        n = modality.numel()
        keep = torch.zeros(n, dtype=torch.bool)
        s = min(self.sinks, n)
        keep[:s] = True
        rest = torch.arange(s, n)
        vis = rest[modality[rest] == VISION]
        zone_start = -1
        if vis.numel() and self.vision > 0:
            ids, counts = torch.unique_consecutive(chunk[vis], return_counts=True)
            total, first = 0, len(ids)
            for j in range(len(ids) - 1, -1, -1):  # newest chunks first, whole chunks only
                if total + int(counts[j]) > self.vision:
                    break
                total += int(counts[j])
                first = j
            if first < len(ids):
                kept = vis[int(counts[:first].sum()):]
                keep[kept] = True
                zone_start = int(kept[0])
        txt = rest[modality[rest] == TEXT]
        recent = txt[txt >= zone_start][-self.text_recent:] if self.text_recent else txt[:0]
        keep[recent] = True
        older = txt[~keep[txt]]
        if self.text_sink:
            keep[older[: self.text_sink]] = True
        if self.text_window:
            keep[older[-self.text_window:]] = True
        return keep

    def select(self, entries: Entries, incoming: int, modality: int) -> torch.Tensor | None:
        n = len(entries)
        if n + incoming <= self.budget:
            return None
        chunk_id = int(entries.chunk.max()) + 1 if n else 0
        mods = torch.cat([entries.modality, torch.full((incoming,), modality, dtype=torch.uint8)])
        chunks = torch.cat([entries.chunk, torch.full((incoming,), chunk_id, dtype=torch.long)])
        keep = self.keep_mask(mods, chunks)
        return torch.nonzero(keep[:n]).flatten()
