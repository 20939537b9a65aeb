"""The attention function registered with transformers' ``AttentionInterface`` as ``"infercache"``.

It needs no per-model code: every HF attention module calls ``cache.update(...)`` and then the attention
function with the keys and values the cache returned. When those came from a :class:`CompressedLayer`:

* **prefill** (the layer's cache was empty): exact attention over the full prompt, then the layer's cache
  is compressed (the prompt's own output is unaffected: invariant 3 of the design notes);
* **later forwards** (decode, or a multi-token forward such as a question after compression): attention
  over the ragged cache with a validity mask built per (row, KV head) from the kept lengths, causal among
  the new tokens only. Uniform lengths take transformers' own sdpa path unchanged.

Layers the cache leaves alone (Gemma-3's sliding-window layers, a plain ``DynamicCache``) go straight to
transformers' sdpa attention.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "infercache"
_LOCAL = threading.local()


def mark_update(layer, keys: torch.Tensor) -> None:
    """Called by a compressed layer's ``update``: the next attention call for this layer is ours."""
    _LOCAL.layer = layer
    _LOCAL.shape = tuple(keys.shape)


def claim(module, key: torch.Tensor):
    """The layer whose update this attention call follows (and forget it), or None for a foreign cache."""
    layer = getattr(_LOCAL, "layer", None)
    if layer is None:
        return None
    _LOCAL.layer = None
    if layer.layer_idx != getattr(module, "layer_idx", None) or tuple(key.shape) != _LOCAL.shape:
        raise RuntimeError(
            "infercache: the attention call does not match the cache update it follows "
            f"(layer {getattr(module, 'layer_idx', None)} vs {layer.layer_idx}); this model's attention is not supported"
        )
    return layer


def infercache_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    layer = claim(module, key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer.pending is not None:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        layer.engine.compress_prefill(layer, module, query, attention_mask, scaling, kwargs.get("position_ids"))
        return out
    out = ragged_attention(module, query, key, value, layer.last_old, dropout, scaling, bias=layer.last_bias, **kwargs)
    layer.engine.after_forward(layer, module, query, key, scaling)
    return out


def ragged_attention(module, query, key, value, old_lengths, dropout, scaling, bias=None, **kwargs):
    """Attention of ``q`` new tokens over a ragged cache: ``[B, Hkv, L]`` slots, ``old + q`` real per head.

    ``bias`` ``[B, Hkv, L]`` is an optional per-entry logit offset (e.g. RazorAttention's compensation
    token counts ``|D|`` times: ``+ln|D|``).
    """
    b, h, q, _ = query.shape
    hkv, length = key.shape[1], key.shape[2]
    if bias is None and bool((old_lengths == old_lengths.flatten()[0]).all()):
        old = int(old_lengths.flatten()[0])
        if old + q == length and q == 1:
            mask = None  # every slot is real: exactly transformers' decode path
        else:
            idx = torch.arange(length, device=query.device)
            mask = (idx[None, :] <= old + torch.arange(q, device=query.device)[:, None])[None, None]
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    mask = head_mask(old_lengths.to(query.device), q, length)  # [B, Hkv, q, L]
    if bias is not None:
        bias = bias.to(device=query.device, dtype=query.dtype)[:, :, None, :].expand(b, hkv, q, length)
        mask = torch.where(mask, bias, torch.full_like(bias, float("-inf")))
    g = h // hkv
    mask = mask[:, :, None].expand(b, hkv, g, q, length).reshape(b, h, q, length)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=g > 1)
    return out.transpose(1, 2).contiguous(), None


def head_mask(old_lengths: torch.Tensor, q: int, length: int) -> torch.Tensor:
    """``[B, Hkv, q, L]``: new token ``i`` of a head sees its ``old`` kept entries and new tokens ``<= i``."""
    idx = torch.arange(length, device=old_lengths.device)
    limit = old_lengths[:, :, None] + torch.arange(q, device=old_lengths.device)[None, None, :]
    return idx[None, None, None, :] <= limit[..., None]


def register() -> str:
    """Register the attention function and its mask builder (idempotent); returns the implementation name."""
    AttentionInterface.register(ATTN_NAME, infercache_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
