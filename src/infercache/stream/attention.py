"""The ``"infercache_stream"`` attention function (registered with transformers' ``AttentionInterface``).

Every HF attention module calls ``cache.update`` and then the attention function. When the update came from a
:class:`~infercache.stream.cache.StreamLayer`, this function builds the mask from the cache instead of the one
transformers prepared (none is prepared: no mask function is registered for this name): new token ``i`` of ``q``
sees the held entries and new tokens ``<= i``; with a ``sliding_window`` (Gemma-3's local layers) only keys less
than ``window`` entries back; retrieved ReKV entries may carry a logit bias (``+ln n`` for a token merged from
``n``). Any other call (the model used outside the stream while one is open) goes to transformers' sdpa with the
mask transformers built (sdpa's mask builder is registered under the same name), so plain use is unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache.attention import claim as _claim
from ..cache.attention import mark_update  # noqa: F401  (stream layers mark their updates through this module)

ATTN_NAME = "infercache_stream"
def stream_mask(q: int, length: int, window: int | None, bias: torch.Tensor | None, dtype, device):
    """``[1, 1, q, L]`` mask: bool, or additive float when there is a bias; ``None`` when nothing is masked."""
    old = length - q
    if bias is None and q == 1 and (window is None or window >= length):
        return None
    idx = torch.arange(length, device=device)
    limit = old + torch.arange(q, device=device)[:, None]
    mask = idx[None, :] <= limit
    if window is not None:
        mask &= idx[None, :] > limit - window
    if bias is None:
        return mask[None, None]
    neg = torch.full((), float("-inf"), dtype=dtype, device=device)
    full = torch.where(mask, bias.to(device=device, dtype=dtype)[None, :], neg)
    return full[None, None]


def stream_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    layer = _claim(module, key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    key, value, bias = layer.attention_inputs(query, key, value)
    window = kwargs.pop("sliding_window", None)
    kwargs.pop("is_causal", None)
    mask = stream_mask(query.shape[2], key.shape[2], window, bias, query.dtype, query.device)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False,
                                  **kwargs)


def register() -> str:
    """Register the attention function and sdpa's mask builder (idempotent); returns the name."""
    AttentionInterface.register(ATTN_NAME, stream_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
