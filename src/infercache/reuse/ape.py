"""``mode="ape"``: Adaptive Parallel Encoding — contexts encoded independently at the same positions, no recompute.

Paper: Yang et al., *APE: Faster and Longer Context-Augmented Generation via Adaptive Parallel Encoding*, ICLR 2025,
https://arxiv.org/abs/2502.05431; code: Infini-AI-Lab/APE (``ape/ape_llama.py``).

Segments: the first is the shared prefix ``P`` (e.g. the system prompt / chat header), the last is the query, every
one in between is a context. As in the authors' code:

1. ``P`` is encoded causally at positions ``0..|P|-1``.
2. Each context ``C_i`` is encoded causally after ``P`` at positions ``|P|..|P|+L_i-1`` — all contexts reuse the same
   positions and never see each other. Their KV is concatenated after ``P``'s.
3. The query (and every generated token) is placed after the longest context, at ``|P| + max_i L_i``, and attends
   with a split softmax: context keys ``C`` with temperature ``T``, the rest ``O`` (prefix, query, generated) as usual,
   merged with weights ``softmax([S·T·lse_C, lse_O])`` where ``lse_C = log Σ_C exp(s/T)`` and
   ``lse_O = log Σ_O exp(s)``.
   ``T = S = 1`` is exact attention over the union. Defaults ``temperature=0.9``, ``scale=0.9`` (the authors' demo
   and README); the merge is done in float32 (their code casts ``lse`` to bf16).

Storage: ``P`` and each context are stored under keys that commit to the prefix (a context encoded after another
prefix is a different KV), so a hit gives exactly the KV APE would compute; APE itself is the approximation.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import DynamicCache

from ..store import KVStore, segment_keys
from .attention import hooked_attention
from .decode import StepFn, cache_from_kv
from .rope import RopeInfo, rotate_keys
from .runner import run_tokens
from .segments import TokenizedSegment
from .state import PromptState

#: The authors' defaults (demo / README).
DEFAULT_TEMPERATURE = 0.9
DEFAULT_SCALE = 0.9
STORED_KIND = "ape"


def ape_attention(context: tuple[int, int], temperature: float, scale: float):
    """Attention replacement: split softmax over context keys ``[start, end)`` and the other keys (causal)."""
    c0, c1 = context

    def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
        groups = query.shape[1] // key.shape[1]
        k = key.float().repeat_interleave(groups, dim=1)
        v = value.float().repeat_interleave(groups, dim=1)
        scaling = kwargs.get("scaling") or module.scaling
        scores = query.float() @ k.transpose(-1, -2) * scaling  # [B, H, q, T]
        total, q_len = k.shape[2], query.shape[2]
        index = torch.arange(total, device=query.device)
        query_index = total - q_len + torch.arange(q_len, device=query.device)
        other = ((index < c0) | (index >= c1))[None, :] & (index[None, :] <= query_index[:, None])
        s_other = scores.masked_fill(~other, float("-inf"))
        lse_other = torch.logsumexp(s_other, dim=-1, keepdim=True)
        out_other = torch.softmax(s_other, dim=-1) @ v
        if c1 > c0:
            s_ctx = scores[..., c0:c1] / temperature
            lse_ctx = torch.logsumexp(s_ctx, dim=-1, keepdim=True)
            out_ctx = torch.softmax(s_ctx, dim=-1) @ v[:, :, c0:c1]
            weights = torch.softmax(torch.stack([scale * temperature * lse_ctx, lse_other]), dim=0)
            out = weights[0] * out_ctx + weights[1] * out_other
        else:
            out = out_other
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attend


def _ape_keys(segments: list[TokenizedSegment], kv_store: KVStore) -> list[str]:
    """Prefix key, then one key per context committing to (prefix, context)."""
    prefix = segments[0].ids
    keys = [segment_keys([prefix], kv_store.namespace, chained=True)[0].chain_key]
    for seg in segments[1:-1]:
        keys.append(segment_keys([prefix, seg.ids], kv_store.namespace, chained=True)[1].chain_key)
    return keys


@torch.no_grad()
def ape_prompt(model: torch.nn.Module, segments: list[TokenizedSegment], kv_store: KVStore | None, rope: RopeInfo,
               *, temperature: float = DEFAULT_TEMPERATURE, scale: float = DEFAULT_SCALE) -> PromptState:
    """Prompt pass of APE: prefix, contexts in parallel (from the store when possible), query with split attention."""
    if len(segments) < 2:
        raise ValueError("mode='ape' needs at least a prefix segment and a query segment")
    if temperature <= 0 or scale <= 0:
        raise ValueError(f"APE temperature and scale must be > 0, got {temperature!r}, {scale!r}")
    device = next(model.parameters()).device
    prefix, contexts, query = segments[0], segments[1:-1], segments[-1]
    keys = _ape_keys(segments, kv_store) if kv_store is not None else [""] * (len(segments) - 1)
    cacheable = [s.cache and kv_store is not None for s in segments[:-1]]
    read_s, hits, misses, corrupt, reused, fresh = 0.0, 0, 0, 0, 0, 0
    pending: list[tuple[str, list[tuple[torch.Tensor, torch.Tensor]], int]] = []
    before = kv_store.stats().corrupt if kv_store is not None else 0

    def fetch(index: int, num_tokens: int, start: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        nonlocal read_s, hits, misses
        if not cacheable[index]:
            return None
        t0 = time.perf_counter()
        found = kv_store.get_chunk(keys[index], num_tokens=num_tokens)
        kv = None
        if found is not None and found[1].extra.get("kind") == STORED_KIND:
            delta = start - found[1].start
            kv = [(rotate_keys(k.to(device), delta, rope.inv_freq.to(device))[None], v.to(device)[None])
                  for k, v in found[0]]
        read_s += time.perf_counter() - t0
        hits, misses = hits + (kv is not None), misses + (kv is None)
        return kv

    p_len = len(prefix.ids)
    prefix_kv = fetch(0, p_len, 0)
    if prefix_kv is None:
        cache = DynamicCache()
        model(torch.tensor([prefix.ids], device=device), cache=cache, use_cache=True, logits_to_keep=1)
        prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        fresh += p_len
        if cacheable[0]:
            pending.append((keys[0], prefix_kv, 0))
    else:
        reused += p_len
    context_kv = []
    for offset, seg in enumerate(contexts, start=1):
        kv = fetch(offset, len(seg.ids), p_len)
        if kv is None:
            cache = cache_from_kv(prefix_kv)
            positions = torch.arange(p_len, p_len + len(seg.ids), device=device)[None]
            model(torch.tensor([seg.ids], device=device), cache=cache, position_ids=positions, use_cache=True,
                  logits_to_keep=1)
            kv = [(layer.keys[:, :, p_len:], layer.values[:, :, p_len:]) for layer in cache.layers]
            fresh += len(seg.ids)
            if cacheable[offset]:
                pending.append((keys[offset], kv, p_len))
        else:
            reused += len(seg.ids)
        context_kv.append(kv)
    corrupt = (kv_store.stats().corrupt - before) if kv_store is not None else 0
    layers = [(torch.cat([prefix_kv[i][0]] + [c[i][0] for c in context_kv], dim=2),
               torch.cat([prefix_kv[i][1]] + [c[i][1] for c in context_kv], dim=2)) for i in range(len(prefix_kv))]
    cache = cache_from_kv(layers)
    context_span = (p_len, p_len + sum(len(s.ids) for s in contexts))
    query_start = p_len + max((len(s.ids) for s in contexts), default=0)
    attend = ape_attention(context_span, temperature, scale)
    q_ids = torch.tensor(query.ids, device=device)
    q_pos = torch.arange(query_start, query_start + len(query.ids), device=device)
    with hooked_attention(model, replace=attend):
        logits = run_tokens(model, q_ids, q_pos, cache)
    fresh += len(query.ids)

    def step(token: int, position: int, state) -> torch.Tensor:
        with hooked_attention(model, replace=attend):
            return run_tokens(model, torch.tensor([token], device=device), torch.tensor([position], device=device),
                              state)

    def write() -> int:
        return sum(int(kv_store.put_chunk(key, [(k[0], v[0]) for k, v in kv], start=start,
                                          extra={"kind": STORED_KIND})) for key, kv, start in pending)

    step_fn: StepFn = step
    return PromptState(logits=logits, cache=cache, next_position=query_start + len(query.ids), step=step_fn,
                       reused=reused, recomputed=0, fresh=fresh, hits=hits, misses=misses, corrupt=corrupt,
                       read_s=read_s, details={"temperature": temperature, "scale": scale,
                                               "query_position": query_start, "context_tokens": context_span},
                       write=write if kv_store is not None else None)
