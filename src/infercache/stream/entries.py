"""What a stream cache knows about each held entry (shared by all layers; entries stay in stream order)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT, VISION = 0, 1
MODALITIES = {"text": TEXT, "vision": VISION}


@dataclass
class Entries:
    """Per-entry metadata, one column per held KV entry.

    ``index``: position in the whole stream (0, 1, 2, ... over everything ever fed); ``pos``: current
    (re-positioned) RoPE position, ``[N]`` or ``[3, N]``; ``modality``: 0 text, 1 vision; ``chunk``: which feed
    chunk the entry came from (a frame is one chunk).
    """

    index: torch.Tensor
    pos: torch.Tensor
    modality: torch.Tensor
    chunk: torch.Tensor

    @classmethod
    def empty(cls, dims: int) -> "Entries":
        pos = torch.zeros(0, dtype=torch.long) if dims == 1 else torch.zeros(3, 0, dtype=torch.long)
        none = torch.zeros(0, dtype=torch.long)
        return cls(none, pos, torch.zeros(0, dtype=torch.uint8), none.clone())

    @classmethod
    def new(cls, start_index: int, pos: torch.Tensor, modality: int, chunk: int) -> "Entries":
        n = pos.shape[-1]
        return cls(
            torch.arange(start_index, start_index + n),
            pos.long(),
            torch.full((n,), modality, dtype=torch.uint8),
            torch.full((n,), chunk, dtype=torch.long),
        )

    def __len__(self) -> int:
        return int(self.index.numel())

    def take(self, idx: torch.Tensor) -> "Entries":
        return Entries(self.index[idx], self.pos[..., idx], self.modality[idx], self.chunk[idx])

    def cat(self, other: "Entries") -> "Entries":
        return Entries(
            torch.cat([self.index, other.index]),
            torch.cat([self.pos, other.pos], dim=-1),
            torch.cat([self.modality, other.modality]),
            torch.cat([self.chunk, other.chunk]),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.pos, self.modality, self.chunk))
