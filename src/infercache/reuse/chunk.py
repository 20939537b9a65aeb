"""``mode="chunk"`` (and the shared path of ``cacheblend`` / ``cachecraft``): position-independent segment reuse.

Each cacheable segment (by default every segment but the last, e.g. system prompt and RAG documents) is stored under
its content key (:func:`infercache.store.segment_keys`: the same document gets the same key at any offset). A blob
holds the segment's KV *as computed in the request that first stored it* (post-RoPE, with its ``start``, the keys and
lengths of the segments before it, and Cache-Craft attention statistics). On reuse the keys are re-rotated by
``new_start - stored_start`` (:mod:`.rope`) and the values are used as they are.

Pure chunk reuse (``mode="chunk"``) then computes only the tokens without stored KV (the question, documents not
stored yet) at every layer: they attend to the whole re-positioned KV. This is approximate: a reused segment's KV
ignores what now precedes it (cross-segment attention), which is what CacheBlend / Cache-Craft repair. A segment
reused at the same offset after the same segments is exact up to float rounding. The last prompt token is always
computed (it gives the first logits), even when its segment is cached.

Only segments that missed are written, after the first token: one variant per segment (the first stored wins).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..store import KVStore, segment_keys
from .attention import hooked_attention
from .attnstats import SegmentStatsObserver
from .cacheblend import BlendSelection, blend_selector
from .cachecraft import fix_plan, pick_tokens
from .decode import cache_from_kv, hf_step
from .rope import RopeInfo, rotate_keys
from .runner import run_prompt
from .segments import TokenizedSegment
from .state import PromptState

STORED_KIND = "segment"


@dataclass
class SegmentLookup:
    """One prompt segment: its content key, whether it was cacheable / found, and the stored blob's metadata."""

    segment: TokenizedSegment
    key: str
    cache: bool
    hit: bool = False
    stored_start: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_segments(segments: list[TokenizedSegment], kv_store: KVStore | None, rope: RopeInfo, device: torch.device,
                  ) -> tuple[list[SegmentLookup], list[tuple[torch.Tensor, torch.Tensor]] | None, torch.Tensor, int]:
    """Look every cacheable segment up, re-rotate hits into per-layer ``[1, H, N, D]`` buffers.

    Returns the lookups, the buffers (``None`` without any hit), the ``[N]`` mask of tokens with stored KV, and the
    number of corrupt entries met.
    """
    total = segments[-1].end
    namespace_keys = (segment_keys([s.ids for s in segments], kv_store.namespace)
                      if kv_store is not None else [None] * len(segments))
    lookups = [SegmentLookup(segment=s, key=k.key if k is not None else "", cache=s.cache and kv_store is not None)
               for s, k in zip(segments, namespace_keys)]
    have = torch.zeros(total, dtype=torch.bool, device=device)
    buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    corrupt = 0
    if kv_store is None:
        return lookups, None, have, 0
    before = kv_store.stats().corrupt
    for lookup in lookups:
        if not lookup.cache:
            continue
        seg = lookup.segment
        found = kv_store.get_chunk(lookup.key, num_tokens=len(seg.ids))
        if found is None:
            continue
        kv, meta = found
        if meta.extra.get("kind") != STORED_KIND:
            continue
        lookup.hit, lookup.stored_start, lookup.extra = True, meta.start, meta.extra
        if buffers is None:
            buffers = [(torch.zeros(1, k.shape[0], total, k.shape[2], dtype=k.dtype, device=device),
                        torch.zeros(1, v.shape[0], total, v.shape[2], dtype=v.dtype, device=device)) for k, v in kv]
        delta = seg.start - meta.start
        for (keys, values), (buf_k, buf_v) in zip(kv, buffers):
            buf_k[0, :, seg.start:seg.end] = rotate_keys(keys.to(device), delta, rope.inv_freq.to(device))
            buf_v[0, :, seg.start:seg.end] = values.to(device)
        have[seg.start:seg.end] = True
    corrupt = kv_store.stats().corrupt - before
    return lookups, buffers, have, corrupt


@torch.no_grad()
def chunk_prompt(model: torch.nn.Module, segments: list[TokenizedSegment], kv_store: KVStore | None,
                 rope: RopeInfo, *, mode: str = "chunk", recompute_ratio: float = 0.15, check_layer: int = 1,
                 deviation: str = "value", alpha: float = 0.3, collect_stats: bool | None = None) -> PromptState:
    """Prompt pass of the chunk modes: load and re-rotate stored segments, pick the computed rows, run, store.

    ``collect_stats`` (default: only in ``cachecraft`` mode) records Cache-Craft attention statistics of the
    segments that will be stored; it costs an extra attention pass over their queries (+50-70 % on a cold 2K-token
    SmolLM2 request on CPU), which is why the other modes skip it.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([t for s in segments for t in s.ids], device=device)
    total = ids.numel()
    read_start = time.perf_counter()
    lookups, stored, have, corrupt = load_segments(segments, kv_store, rope, device)
    have[-1] = False  # the last prompt token is always computed
    read_s = time.perf_counter() - read_start
    if stored is None:
        have[:] = False
    fresh = ~have
    details: dict[str, Any] = {}
    check, selector, record = None, None, None
    rows = fresh.nonzero().flatten()
    num_layers = int(model.config.num_hidden_layers)
    if mode == "cacheblend" and stored is not None:
        check = min(max(int(check_layer), 0), num_layers - 1)
        record = BlendSelection()
        selector = blend_selector(have, recompute_ratio, deviation, record)
        rows = torch.arange(total, device=device)
        details.update(recompute_ratio=recompute_ratio, check_layer=check, deviation=deviation)
    elif mode == "cachecraft" and stored is not None:
        plans, picked = [], [rows]
        prefix_keys: list[str] = []
        for lookup in lookups:
            seg = lookup.segment
            if lookup.hit:
                extra = lookup.extra
                count = int(have[seg.start:seg.end].sum())
                plan = fix_plan(extra.get("stats"), extra.get("prefix", []), extra.get("prefix_lengths", []),
                                prefix_keys, count, alpha)
                local = pick_tokens(extra.get("stats"), plan.recompute, len(seg.ids))
                local = local[local < count]
                picked.append(local.to(device) + seg.start)
                plans.append({"segment": seg_index(lookups, lookup), **plan.as_dict()})
            prefix_keys.append(lookup.key)
        rows = torch.cat(picked).unique().sort().values
        details.update(alpha=alpha, segments=plans)
    targets = {i: (lk.segment.start, lk.segment.end) for i, lk in enumerate(lookups) if lk.cache and not lk.hit}
    if collect_stats is None:
        collect_stats = mode == "cachecraft"
    observer = (SegmentStatsObserver(targets, [(lk.segment.start, lk.segment.end) for lk in lookups])
                if targets and collect_stats else None)
    if observer is not None:
        with hooked_attention(model, observe=observer):
            result = run_prompt(model, ids, stored=stored, rows=rows, check_layer=check, selector=selector,
                                on_rows=observer.set_rows)
    else:
        result = run_prompt(model, ids, stored=stored, rows=rows, check_layer=check, selector=selector)
    reused_mask = have.clone()
    if mode == "cacheblend" and record is not None and record.picked is not None:
        reused_mask[record.picked] = False
    elif mode == "cachecraft" and stored is not None:
        reused_mask[rows] = False
    reused = int(reused_mask.sum())
    recomputed = int(have.sum()) - reused
    hits = sum(1 for lk in lookups if lk.hit)
    misses = sum(1 for lk in lookups if lk.cache and not lk.hit)

    def write() -> int:
        if kv_store is None:
            return 0
        written = 0
        for index, lookup in enumerate(lookups):
            if not lookup.cache or lookup.hit:
                continue
            seg = lookup.segment
            kv = [(k[0, :, seg.start:seg.end], v[0, :, seg.start:seg.end]) for k, v in result.kv]
            extra = {"kind": STORED_KIND, "prefix": [lk.key for lk in lookups[:index]],
                     "prefix_lengths": [len(lk.segment.ids) for lk in lookups[:index]],
                     "stats": observer.stats(index) if observer is not None else None}
            written += int(kv_store.put_chunk(lookup.key, kv, start=seg.start, extra=extra))
        return written

    cache = cache_from_kv(result.kv)
    return PromptState(logits=result.logits, cache=cache, next_position=total, step=hf_step(model), reused=reused,
                       recomputed=recomputed, fresh=int(fresh.sum()), hits=hits, misses=misses, corrupt=corrupt,
                       read_s=read_s, layer_rows=result.rows_per_layer, details=details, write=write)


def seg_index(lookups: list[SegmentLookup], lookup: SegmentLookup) -> int:
    return next(i for i, lk in enumerate(lookups) if lk is lookup)
