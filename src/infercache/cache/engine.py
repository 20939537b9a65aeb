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
        self._deferred = []  # global-budget policies: layers scored at prefill, waiting for the last one
        self.layers = None  # the cache's layers by index (set by the cache; global eviction walks them)

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
    def _attention_input(self, layer):
        hidden, layer.attn_input = layer.attn_input, None
        if hidden is None and self.policy.needs_attention_input:
            raise RuntimeError(
                f"infercache: {self.policy.name} needs each layer's attention input, but none was captured for layer "
                f"{layer.layer_idx}; build the cache with infercache.compressed_cache(model, ...), which installs "
                "the capture hooks"
            )
        return hidden

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
        if policy.entry_channels:
            entry = policy.entry_stats(layer.layer_idx, self._attention_input(layer), positions)
            channels.update(entry)
            ctx.stats.update(entry)
            ctx.stats["seen"] = positions[:, -1] + 1
        if not skip:
            capacity = policy.layer_capacities(capacity, lengths, ctx).cpu()
        scores = None
        if skip or bool((capacity >= lengths).all()):
            # Keep every real token (left padding is dropped: the cache holds real entries only).
            keep, head_caps = select(valid.float(), valid, lengths[:, None].expand(b, hkv))
            if policy.needs_decode_attention:
                scores = policy.score(ctx).float()
        elif policy.global_budget:
            # Scored now, selected once every compressed layer is scored (one top-k over all of them).
            scores = self._scores(ctx, capacity[:, None].expand(b, hkv))
            self._deferred.append((layer, channels, scores, valid, capacity, lengths, positions, query))
            if layer.layer_idx == self.compressed_layers[-1]:
                self._select_global_prefill()
            self.prefill_seconds += time.perf_counter() - start
            return
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
        self._install(layer, channels, keep, head_caps, lengths, positions, query, skip)
        self.prefill_seconds += time.perf_counter() - start

    def _install(self, layer, channels, keep, head_caps, lengths, positions, query, skip) -> None:
        """Write a layer's selection into its ragged store and set its decode-time capacity."""
        policy = self.policy
        b, hkv = head_caps.shape
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

    def _select_global_prefill(self) -> None:
        """One top-k per row over every deferred layer's scores; each layer then keeps what it won."""
        deferred, self._deferred = self._deferred, []
        scores = [d[2] for d in deferred]
        valids = [d[3] for d in deferred]
        totals = sum(d[4] for d in deferred) * deferred[0][2].shape[1]  # [B]: sum of layer budgets x Hkv
        caps = global_capacities(scores, valids, totals)
        for (layer, channels, score, valid, _, lengths, positions, query), cap in zip(deferred, caps):
            keep, head_caps = select(score, valid, cap)
            self._install(layer, channels, keep, head_caps, lengths, positions, query, False)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def new_entry_stats(self, layer, q: int) -> dict:
        """Per-entry statistics of ``q`` tokens about to be appended to ``layer`` (``{}`` for most policies)."""
        if not self.policy.entry_channels:
            return {}
        positions = layer.next_position + torch.arange(q, device=layer.next_position.device)[None]
        return self.policy.entry_stats(layer.layer_idx, self._attention_input(layer), positions)

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
        if policy.global_budget:
            layer.last_call = (module, scaling)
            if layer.layer_idx == self.compressed_layers[-1]:
                self._evict_global_if_due(layer.steps_since)
            return
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

    def _decode_context(self, layer, module, scaling):
        store = layer.store
        chans, valid = store.gather()
        stats = {"next_position": layer.next_position, "prefill_kept": layer.prefill_kept,
                 "seen": layer.next_position[:, -1]}
        for name in ("acc", *self.policy.entry_channels):
            if name in chans:
                stats[name] = chans[name]
        return self._context(layer, chans["k"], chans["v"], valid.to(chans["k"].device), layer.query_buffer, scaling,
                             "decode", module, stats=stats)

    def _evict(self, layer, module, scaling) -> None:
        ctx = self._decode_context(layer, module, scaling)
        capacity = layer.capacity
        scores = self._scores(ctx, capacity)
        keep, counts = select(scores, ctx.valid, capacity)
        layer.store.keep(keep, counts)

    def _evict_global_if_due(self, steps_since: int) -> None:
        layers = [self.layers[i] for i in self.compressed_layers]
        layers = [layer for layer in layers if layer.store is not None and layer.capacity is not None]
        if not layers:
            return
        # entries over the total, per (layer, KV head) on average: comparable to compress_every as for one head
        heads = sum(layer.capacity.shape[1] for layer in layers)
        over = sum((layer.store.lengths - layer.capacity).sum(-1) for layer in layers).float() / heads  # [B]
        if float(over.max()) >= self.compress_every or (steps_since >= self.compress_every and float(over.max()) > 0):
            ctxs = [self._decode_context(layer, *layer.last_call) for layer in layers]
            scores = [self._scores(ctx, layer.capacity) for ctx, layer in zip(ctxs, layers)]
            totals = sum(layer.capacity.sum(-1) for layer in layers)
            caps = global_capacities(scores, [ctx.valid for ctx in ctxs], totals)
            for layer, score, ctx, cap in zip(layers, scores, ctxs, caps):
                keep, counts = select(score, ctx.valid, cap)
                layer.store.keep(keep, counts)
                layer.capacity = counts.clone()
                layer.steps_since = 0


def global_capacities(scores: list[torch.Tensor], valids: list[torch.Tensor], totals: torch.Tensor) -> list[torch.Tensor]:
    """Split ``totals[b]`` entries over every (layer, KV head) by one top-k over all their scores.

    ``scores``/``valids``: one ``[B, Hkv, L_l]`` per layer (lengths may differ). Returns one ``[B, Hkv]`` count
    per layer: how many of that head's entries are in the row's global top ``totals[b]``.
    """
    b, hkv = scores[0].shape[:2]
    flat = torch.cat([s.float().masked_fill(~v, float("-inf")).reshape(b, -1) for s, v in zip(scores, valids)], -1)
    owner = torch.cat([torch.arange(i * hkv, (i + 1) * hkv).repeat_interleave(s.shape[-1]) for i, s in enumerate(scores)])
    counts = torch.zeros(b, len(scores) * hkv, dtype=torch.long)
    n_valid = torch.stack([v.sum((-1, -2)) for v in valids]).sum(0).cpu()
    for row in range(b):
        k = int(min(int(totals[row]), int(n_valid[row])))
        if k <= 0:
            continue
        top = torch.sort(flat[row], descending=True, stable=True).indices[:k].cpu()
        counts[row] = torch.bincount(owner[top], minlength=len(scores) * hkv)
    return list(counts.view(b, len(scores), hkv).unbind(1))


def _valid_tokens(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """Which prompt tokens are real (not padding): ``[B, L]`` bool, read off the last query's mask row."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    row = attention_mask[:, 0, -1, -length:]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, length).clone()
