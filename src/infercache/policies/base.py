"""The policy contract: a policy scores cache entries; the engine owns budgets, allocation and eviction.

A policy sees one layer at a time through a :class:`ScoreContext` (post-RoPE keys and values grouped per
KV head, the queries it asked for, which entries are real) and returns one score per
``(batch, kv_head, entry)``: higher means keep. Scores of GQA query heads are reduced to their KV head
inside the policy (mean by default, ``gqa_reduce="max"`` as option); nothing is expanded to query heads.

Allocation (how many entries each layer and head keeps) is a separate, composable piece: uniform by
default, ``PyramidKV``'s layer schedule, ``AdaKV``'s head-adaptive split. Protected sink and recent
tokens are engine options that work with any scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

NEG_INF = float("-inf")


@dataclass
class ScoreContext:
    """What a policy may look at for one layer.

    Shapes: ``keys``/``values`` ``[B, Hkv, L, D]``; ``valid`` ``[B, Hkv, L]`` (False for padding or empty
    slots); ``queries`` ``[B, H, Lq, D]`` post-RoPE (the last ``Lq`` query positions of the prompt at
    prefill, or the buffered recent queries at decode); ``positions`` ``[B, L]`` original positions
    (prefill only, else None). ``phase`` is ``"prefill"`` or ``"decode"``.
    """

    layer_idx: int
    num_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    queries: torch.Tensor | None
    scaling: float
    phase: str
    module: torch.nn.Module | None = None
    positions: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)  # per-entry running statistics the engine keeps (e.g. "acc")
    rotary: Callable | None = None  # rotary(positions [B, T]) -> (cos, sin) for this layer
    layer_rank: int = 0  # index of this layer among the compressed layers (PyramidKV's schedule)
    num_ranked: int = 1  # number of compressed layers

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def group_size(self) -> int:
        return 1 if self.queries is None else self.queries.shape[1] // self.keys.shape[1]


def reduce_group(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """``[B, H, ...]`` per query head -> ``[B, Hkv, ...]`` per KV head (mean or max over the group)."""
    b, h = scores.shape[:2]
    grouped = scores.view(b, num_kv_heads, h // num_kv_heads, *scores.shape[2:])
    if how == "mean":
        return grouped.mean(2)
    if how == "max":
        return grouped.amax(2)
    if how == "sum":
        return grouped.sum(2)
    raise ValueError(f"gqa_reduce must be 'mean', 'max' or 'sum', got {how!r}")


def window_attention(ctx: ScoreContext, window: int) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries over all keys, per query head, fp32: ``[B, H, w, L]``.

    At prefill the window queries are the last prompt tokens and see keys causally (window query ``i``
    sees window keys up to ``i``); invalid entries get zero weight.
    """
    q = ctx.queries[:, :, -window:].float()
    k = ctx.keys.float()
    g = ctx.group_size
    k = k.repeat_interleave(g, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * ctx.scaling  # [B, H, w, L]
    valid = ctx.valid.repeat_interleave(g, dim=1)[:, :, None, :]
    mask = valid.expand_as(logits).clone()
    if ctx.phase == "prefill":
        w, length = q.shape[2], k.shape[2]
        causal = torch.arange(length)[None, :] <= (length - w + torch.arange(w))[:, None]
        mask &= causal.to(mask.device)
    logits = logits.masked_fill(~mask, NEG_INF)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


class Policy:
    """Base class: subclasses set ``name`` and implement :meth:`score`.

    Class attributes a policy may set:

    * ``window``: the number of last prompt queries it needs (observation window); 0 for none.
      At prefill those window tokens are protected (kept on top of the scored ones, inside the budget).
    * ``decode_mode``: ``"grow"`` (prefill-only methods: the cache grows during decoding, as in the papers),
      or ``"evict"`` (methods that evict while decoding, e.g. H2O, TOVA, StreamingLLM: the budget holds).
    * ``needs_decode_attention``: the engine accumulates each decode query's attention into the ``acc``
      statistic (H2O) or keeps the last one in ``last`` (TOVA).
    """

    name: str = "base"
    window: int = 0
    decode_mode: str = "grow"
    needs_decode_attention: bool = False
    needs_prefill_attention_sum: bool = False
    shared_across_heads: bool = False  # one index set per layer (TOVA), broadcast to every KV head
    skip_layers: tuple[int, ...] = ()  # layers the policy leaves uncompressed

    def prepare(self, model) -> None:
        """Called once with the model when a cache is built (e.g. RazorAttention loads its head profile)."""

    capacity_tracks_seen: bool = False  # while decoding, capacity = ratio x tokens seen (Elastic Cache)
    global_budget: bool = False  # one top-k over all compressed layers and KV heads together (retention gates)
    needs_attention_input: bool = False  # the engine hands entry_stats each new token's attention input
    entry_channels: tuple[str, ...] = ()  # per-entry statistics kept next to K/V (names of entry_stats' keys)

    def entry_stats(self, layer_idx: int, hidden: torch.Tensor | None, positions: torch.Tensor) -> dict:
        """Per-entry statistics of new tokens, ``{name: [B, Hkv, T]}``, stored with them and evicted with them;
        they reach :meth:`score` through ``ctx.stats``. ``hidden`` is the attention input ``[B, T, d]`` (when
        ``needs_attention_input``), ``positions`` ``[B, T]``."""
        return {}

    def shared_selection(self, ctx: ScoreContext):
        """A selection ``(keep, counts)`` reused from another layer, or None to score this one (WindowKV)."""
        return None

    def remember_selection(self, ctx: ScoreContext, keep: torch.Tensor, counts: torch.Tensor) -> None:
        """Called with each layer's selection (for methods that share indices across layers)."""

    def merge(self, ctx: ScoreContext, keep: torch.Tensor, counts: torch.Tensor) -> dict | None:
        """Merging methods return dense replacement channels ``{"k", "v"[, "bias"]}`` ``[B, Hkv, L, ...]``
        whose kept entries hold the merged values; ``bias`` is a per-entry attention-logit offset."""
        return None

    def recent_to_protect(self, capacity: int) -> int:
        """How many newest entries the policy itself protects at a given capacity (H2O's recent half)."""
        return 0

    def layer_capacities(self, capacity: torch.Tensor, lengths: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        """Per-row capacity of this layer ``[B]`` from the uniform one (PyramidKV overrides)."""
        return capacity

    def head_capacities(self, scores: torch.Tensor, capacity: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        """Per-(row, KV head) capacities ``[B, Hkv]`` from the layer capacity ``[B]`` (AdaKV overrides)."""
        return capacity[:, None].expand(scores.shape[0], scores.shape[1]).clone()

    def score(self, ctx: ScoreContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.__class__.__doc__.strip().splitlines()[0] if self.__class__.__doc__ else self.name
