"""Layer-by-layer prompt pass with a per-layer set of computed tokens (the engine under the chunk modes).

Every prompt token either has stored KV (re-rotated to its position) or is *fresh*. At each layer only the *computed
rows* run through the decoder layer; their queries attend to the whole prompt KV of that layer, which is the stored KV
with the computed rows' fresh K/V written in (a bottom-right causal mask by position). Choices per mode:

* chunk reuse: computed rows = fresh tokens at every layer;
* CacheBlend: every token up to the check layer, where the tokens with the largest KV deviation are picked, and from
  then on fresh + picked tokens; at the check layer only the picked tokens' fresh KV replaces the stored one (LMCache);
* Cache-Craft: fresh tokens + the tokens its rule picked, at every layer;
* no stored KV: every row at every layer, which is exactly a full prefill (same masks, same kernels).

The decoder layers, rotary embedding, final norm and LM head are the model's own modules; we only choose the rows,
the positions, the mask and what the cache returns. ``_RowCache`` stands in for a transformers ``Cache``: the
attention modules only call ``update(key_states, value_states, layer_idx)`` on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .attention import original_implementation

#: ``select(layer, rows, fresh_k, fresh_v, stored_k, stored_v) -> rows kept from this layer on`` (sorted indices).
Selector = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PromptPass:
    """Result of :func:`run_prompt`: last-token logits, the prompt KV per layer (``[1, H, N, D]``), row counts."""

    logits: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    rows_per_layer: list[int] = field(default_factory=list)
    selected: torch.Tensor | None = None


class _RowCache:
    """Duck-typed cache: writes the computed rows' fresh K/V into the stored KV and returns the whole layer."""

    def __init__(self, keys: list[torch.Tensor | None], values: list[torch.Tensor | None], total: int,
                 check_layer: int | None, selector: Selector | None) -> None:
        self.keys, self.values, self.total = keys, values, total
        self.check_layer, self.selector = check_layer, selector
        self.rows = torch.arange(total)
        self.next_rows: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        stored_k, stored_v = self.keys[layer_idx], self.values[layer_idx]
        rows, write_k, write_v = self.rows, key_states, value_states
        if self.selector is not None and layer_idx == self.check_layer and stored_k is not None:
            keep = self.selector(layer_idx, rows, key_states, value_states, stored_k, stored_v)
            self.next_rows = keep
            local = torch.searchsorted(rows, keep)
            rows, write_k, write_v = keep, key_states[:, :, local], value_states[:, :, local]
        if stored_k is None or rows.numel() == self.total:
            keys, values = write_k, write_v  # every row fresh: exactly what a full prefill attends to
        else:
            keys = stored_k.index_copy(2, rows, write_k)
            values = stored_v.index_copy(2, rows, write_v)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    # a few read-only methods some attention code paths query
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.total

    @property
    def is_compileable(self) -> bool:
        return False


def causal_mask(positions: torch.Tensor, rows: torch.Tensor, implementation: str,
                dtype: torch.dtype) -> torch.Tensor | None:
    """Mask for queries ``rows`` over all keys: key ``j`` visible when ``positions[j] <= positions[row]``.

    ``None`` (the kernel's own causal path, as transformers does for a plain prefill) when every row is computed and
    positions are ``0..N-1`` under sdpa; a bool mask for sdpa otherwise; an additive float mask for eager.
    """
    total = positions.numel()
    full = rows.numel() == total and bool(torch.equal(positions, torch.arange(total, device=positions.device)))
    if full and implementation == "sdpa":
        return None
    allowed = positions[None, :] <= positions[rows][:, None]
    if implementation == "sdpa":
        return allowed[None, None]
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def run_prompt(model: torch.nn.Module, ids: torch.Tensor, *, stored: list[tuple[torch.Tensor, torch.Tensor]] | None,
               rows: torch.Tensor, positions: torch.Tensor | None = None, check_layer: int | None = None,
               selector: Selector | None = None, on_rows: Callable[[torch.Tensor], None] | None = None) -> PromptPass:
    """Run the prompt ``ids`` (``[N]``) layer by layer, computing only ``rows`` (sorted, must contain ``N - 1``).

    ``stored``: per-layer ``(K, V)`` ``[1, H, N, D]`` at the right positions (anything in fresh rows is overwritten),
    or ``None`` when every row is computed. ``selector`` runs at ``check_layer`` (CacheBlend). ``on_rows`` is told the
    computed rows before each layer (for attention observers).
    """
    body = model.model
    total = ids.numel()
    device = ids.device
    positions = torch.arange(total, device=device) if positions is None else positions
    rows = rows.to(device)
    if rows.numel() == 0 or int(rows[-1]) != total - 1:
        raise ValueError("the last prompt token must be computed (it gives the next-token logits)")
    if stored is None and rows.numel() != total:
        raise ValueError("without stored KV every prompt token must be computed")
    layers = body.layers[: model.config.num_hidden_layers]
    keys = [None if stored is None else k for k, _ in (stored or [(None, None)] * len(layers))]
    values = [None if stored is None else v for _, v in (stored or [(None, None)] * len(layers))]
    cache = _RowCache(keys, values, total, check_layer, selector)
    implementation = original_implementation(model)
    hidden = body.embed_tokens(ids[None])[:, rows]
    counts = []
    for index, layer in enumerate(layers):
        cache.rows = rows
        if on_rows is not None:
            on_rows(rows)
        row_positions = positions[rows][None]
        mask = causal_mask(positions, rows, implementation, hidden.dtype)
        cos_sin = body.rotary_emb(hidden, position_ids=row_positions)
        hidden = layer(hidden, attention_mask=mask, position_ids=row_positions, cache=cache, use_cache=True,
                       position_embeddings=cos_sin)
        if isinstance(hidden, tuple):  # older layer signatures return (hidden, ...)
            hidden = hidden[0]
        counts.append(int(rows.numel()))
        if cache.next_rows is not None:
            hidden = hidden[:, torch.searchsorted(rows, cache.next_rows)]
            rows, cache.next_rows = cache.next_rows, None
    logits = model.lm_head(body.norm(hidden[:, -1:]))[0, -1]
    kv = [(k, v) for k, v in zip(cache.keys, cache.values)]
    return PromptPass(logits=logits, kv=kv, rows_per_layer=counts)


@torch.no_grad()
def run_tokens(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Append ``ids`` at ``positions`` to a transformers ``cache`` through the decoder layers; last-token logits.

    For modes (APE) whose attention hook ignores the mask and builds its own.
    """
    body = model.model
    hidden = body.embed_tokens(ids[None])
    row_positions = positions[None]
    cos_sin = body.rotary_emb(hidden, position_ids=row_positions)
    for layer in body.layers[: model.config.num_hidden_layers]:
        hidden = layer(hidden, attention_mask=mask, position_ids=row_positions, cache=cache, use_cache=True,
                       position_embeddings=cos_sin)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return model.lm_head(body.norm(hidden[:, -1:]))[0, -1]
