"""Prompt segments: the caller's unit of reuse (system prompt, RAG documents, question).

The prompt is the concatenation of the segments' token ids. Each string segment is tokenized on its own without
special tokens; a BOS token is put in front of the first segment when the tokenizer adds one by default
(``add_bos=None``; token-id segments are taken as given unless ``add_bos=True``). The chunk modes keep that BOS as a
segment of its own, so documents keep their keys when they move. In the chunk modes every segment except the last is
cached by default (the last is the question); ``Segment(..., cache=False/True)`` overrides that per segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Segment:
    """One piece of the prompt: text, or token ids. ``cache=None`` means the default (all but the last segment)."""

    content: str | Sequence[int]
    cache: bool | None = None


@dataclass(frozen=True)
class TokenizedSegment:
    ids: list[int]
    start: int
    cache: bool

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def tokenize_segments(tokenizer: Any, segments: Sequence[Any], *, add_bos: bool | None = None,
                      separate_bos: bool = False) -> list[TokenizedSegment]:
    """Token ids, offsets and cache flags of ``segments`` (strings, id lists/tensors or :class:`Segment`).

    ``separate_bos=True`` makes the BOS token its own (cached) segment, so the first user segment keeps the same
    content key wherever it moves (the chunk modes use this).
    """
    if isinstance(segments, (str, bytes, Segment)) or (hasattr(segments, "dim") and segments.dim() == 1):
        segments = [segments]
    segments = list(segments)
    if not segments:
        raise ValueError("segments is empty: pass at least one prompt segment")
    out: list[TokenizedSegment] = []
    offset = 0
    auto_bos = adds_bos(tokenizer) if add_bos is None else add_bos
    for index, item in enumerate(segments):
        flag = None
        if isinstance(item, Segment):
            item, flag = item.content, item.cache
        if isinstance(item, str):
            ids = list(tokenizer(item, add_special_tokens=False).input_ids)
        elif isinstance(item, torch.Tensor):
            ids = [int(x) for x in item.reshape(-1).tolist()]
        elif isinstance(item, Sequence) and not isinstance(item, bytes):
            ids = [int(x) for x in item]
        else:
            raise TypeError(f"segments[{index}]: expected a str, a list of token ids or a Segment, "
                            f"got {type(item).__name__}")
        bos = auto_bos if (add_bos is not None or isinstance(item, str)) else False
        if index == 0 and bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            if separate_bos:
                out.append(TokenizedSegment(ids=[int(tokenizer.bos_token_id)], start=0, cache=True))
                offset = 1
            else:
                ids = [int(tokenizer.bos_token_id)] + ids
        if not ids:
            raise ValueError(f"segments[{index}] is empty after tokenization")
        cache = flag if flag is not None else index < len(segments) - 1
        out.append(TokenizedSegment(ids=ids, start=offset, cache=bool(cache)))
        offset += len(ids)
    return out
