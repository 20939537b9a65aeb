"""The compression engine: applies a policy to one layer's cache at prefill and while decoding.

The policy only scores; the engine owns budgets (ratio or tokens), per-layer and per-head allocation,
protected sinks and recent tokens, the observation window, decode-time re-scoring every
``compress_every`` steps, and the actual eviction into compact ragged storage.
"""

from __future__ import annotations

import time

import torch

from ..policies.base import Policy, ScoreContext
from .attention import head_mask
from .budget import Budget
from .ragged import RaggedStore
from .selection import protect, select


class CompressionEngine:
    def __init__(
        self,
        policy: Policy,
        budget: Budget,
        *,
        num_layers: int,
        compressed_layers: list[int],
        rotary=None,
        page_size: int = 16,
        sink_tokens: int = 0,
        recent_tokens: int = 0,
        decode_budget: int | None = None,
        compress_every: int | None = None,
    ):
        self.policy = policy
        self.budget = budget
        self.num_layers = num_layers
        self.compressed_layers = compressed_layers
        self.rank = {layer: i for i, layer in enumerate(compressed_layers)}
        self.rotary = rotary
        self.page_size = page_size
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.decode_budget = decode_budget
        evicts = policy.decode_mode == "evict" or decode_budget is not None
        self.evict_while_decoding = evicts and policy.name != "full"
        default_every = 1 if policy.decode_mode == "evict" else 64
        self.compress_every = compress_every or default_every
        if self.compress_every < 1:
            raise ValueError(f"compress_every must be >= 1, got {compress_every}")
        self.prefill_seconds = 0.0  # time spent scoring/selecting at prefill (for overhead reports)

    # ------------------------------------------------------------------ helpers
    def _rotary_for(self, layer_idx: int):
        if self.rotary is None:
            return None
        return lambda positions: self.rotary(layer_idx, positions)

    def _context(self, layer, keys, values, valid, queries, scaling, phase, module, positions=None, stats=None):
        return ScoreContext(
            layer_idx=layer.layer_idx,
            num_layers=self.num_layers,
            keys=keys,
            values=values,
            valid=valid,
            queries=queries,
            scaling=scaling,
            phase=phase,
            module=module,
            positions=positions,
            query_positions=positions,
            stats=stats or {},
            rotary=self._rotary_for(layer.layer_idx),
            layer_rank=self.rank.get(layer.layer_idx, 0),
            num_ranked=len(self.compressed_layers),
        )

    def _scores(self, ctx: ScoreContext, capacity: torch.Tensor) -> torch.Tensor:
        policy = self.policy
        scores = policy.score(ctx).float()
        window = min(policy.window, ctx.valid.shape[-1]) if ctx.phase == "prefill" else 0
        recent = torch.as_tensor([policy.recent_to_protect(int(c)) for c in capacity.flatten().tolist()]).view(
            capacity.shape
        )
        recent = torch.clamp(recent, min=max(window, self.recent_tokens))
        return protect(scores, ctx.valid, first=self.sink_tokens, last=recent.to(scores.device))

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def compress_prefill(self, layer, module, query, attention_mask, scaling, position_ids) -> None:
        start = time.perf_counter()
        keys, values = layer.pending
        layer.pending = None
        b, hkv, length, _ = keys.shape
        valid_tokens = _valid_tokens(attention_mask, b, length, keys.device)
        valid = valid_tokens[:, None, :].expand(b, hkv, length)
        lengths = valid_tokens.sum(-1).cpu()
        policy = self.policy
        channels = {"k": keys, "v": values}
        skip = policy.name == "full" or layer.layer_idx in policy.skip_layers
        capacity = lengths.clone() if skip else self.budget.resolve(lengths)
        positions = position_ids if position_ids is not None else torch.arange(length, device=keys.device)[None]
        positions = positions.expand(b, length)
        ctx = self._context(layer, keys, values, valid, query, scaling, "prefill", module, positions)
        if not skip:
            capacity = policy.layer_capacities(capacity, lengths, ctx).cpu()
        scores = None
        if skip or bool((capacity >= lengths).all()):
            # Keep every real token (left padding is dropped: the cache holds real entries only).
            keep, head_caps = select(valid.float(), valid, lengths[:, None].expand(b, hkv))
            if policy.needs_decode_attention:
                scores = policy.score(ctx).float()
        else:
            shared = policy.shared_selection(ctx)
            if shared is not None:  # e.g. WindowKV: a group leader's indices reused by its group
                keep, head_caps = shared
            else:
                scores = self._scores(ctx, capacity[:, None].expand(b, hkv))
                head_caps = policy.head_capacities(scores, capacity, ctx).cpu()
                keep, head_caps = select(scores, valid, head_caps)
                policy.remember_selection(ctx, keep, head_caps)
            if policy.needs_decode_attention:
                scores = policy.score(ctx).float()  # raw running statistic, without protection boosts
            merged = policy.merge(ctx, keep, head_caps)  # merging methods rewrite kept entries
            if merged:
                channels.update(merged)
        if policy.needs_decode_attention:
            channels["acc"] = scores
        layer.store = RaggedStore.from_dense(channels, keep, head_caps, self.page_size)
        layer.prefill_lengths = lengths
        layer.prefill_kept = head_caps.clone()
        if self.evict_while_decoding:
            if self.decode_budget is not None:
                layer.capacity = torch.full((b, hkv), self.decode_budget, dtype=torch.long)
            elif self.budget.tokens is not None:
                # A token budget bounds the cache while decoding, also when the prompt was shorter than it.
                kept_all = head_caps >= lengths[:, None]
                layer.capacity = torch.where(kept_all, torch.full_like(head_caps, self.budget.tokens), head_caps)
            else:
                layer.capacity = head_caps.clone()
            if skip:
                layer.capacity = None
        if policy.window and layer.capacity is not None:
            layer.query_buffer = query[:, :, -policy.window :].detach()
        layer.next_position = positions[:, -1:].clone() + 1
        self.prefill_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def after_forward(self, layer, module, query, keys, scaling) -> None:
        """Bookkeeping after attention over the ragged cache: statistics, query buffer, eviction."""
        policy = self.policy
        q = query.shape[2]
        layer.next_position = layer.next_position + q
        if layer.capacity is None:
            return
        if policy.needs_decode_attention:
            self._accumulate(layer, query, keys, scaling)
        if policy.window:
            buf = torch.cat([layer.query_buffer, query.detach()], dim=2)
            layer.query_buffer = buf[:, :, -policy.window :]
        layer.steps_since += 1
        if policy.capacity_tracks_seen and self.budget.ratio is not None:
            # the cache is kept at `ratio` of the tokens seen so far (Elastic Cache's rule)
            layer.capacity = torch.full_like(layer.capacity, max(1, int(self.budget.ratio * layer.seen)))
        over = layer.store.lengths - layer.capacity
        if int(over.max()) >= self.compress_every or (layer.steps_since >= self.compress_every and int(over.max()) > 0):
            self._evict(layer, module, scaling)
            layer.steps_since = 0

    def _accumulate(self, layer, query, keys, scaling) -> None:
        """Add the new queries' attention (summed over them, averaged over the GQA group) to ``acc``."""
        store = layer.store
        b, h, q, _ = query.shape
        hkv, length = keys.shape[1], keys.shape[2]
        g = h // hkv
        logits = torch.matmul(query.float(), keys.float().repeat_interleave(g, 1).transpose(-1, -2)) * scaling
        mask = head_mask(layer.last_old.to(query.device), q, length)
        mask = mask[:, :, None].expand(b, hkv, g, q, length).reshape(b, h, q, length)
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
        per_kv = probs.sum(2).view(b, hkv, g, length).mean(2)
        slots, valid = store.slot_index(length)
        flat = per_kv.reshape(b * hkv, length)
        store.pools["acc"].index_add_(0, slots[valid].to(flat.device), flat[valid.to(flat.device)])

    def _evict(self, layer, module, scaling) -> None:
        store = layer.store
        chans, valid = store.gather()
        stats = {"next_position": layer.next_position, "prefill_kept": layer.prefill_kept}
        if "acc" in chans:
            stats["acc"] = chans["acc"]
        ctx = self._context(layer, chans["k"], chans["v"], valid.to(chans["k"].device), layer.query_buffer, scaling,
                            "decode", module, stats=stats)
        capacity = layer.capacity
        scores = self._scores(ctx, capacity)
        keep, counts = select(scores, ctx.valid, capacity)
        store.keep(keep, counts)


def _valid_tokens(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """Which prompt tokens are real (not padding): ``[B, L]`` bool, read off the last query's mask row."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    row = attention_mask[:, 0, -1, -length:]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, length).clone()
