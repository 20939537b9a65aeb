"""Which models the chunk modes (chunk, cacheblend, cachecraft, ape) accept, with clear errors for the rest.

Prefix reuse is exact for every decoder-only model transformers can cache; chunk reuse re-rotates stored keys and runs
the decoder layers one by one, so it needs the standard HF decoder layout (``model.model.embed_tokens / layers / norm
/ rotary_emb``, ``model.lm_head``), a re-rotatable RoPE (:mod:`.rope`), ``sdpa`` or ``eager`` attention, and no
sliding-window layers.

**Gemma-3 (and any model with sliding-window layers) is refused.** A sliding layer's KV of a reused chunk was computed
from another window of tokens, and recomputing only the sliding layers is no cheaper than a full prefill: a sliding
layer needs every token's hidden state, which needs every token through every earlier (full) layer too. Prefix reuse
works for these models (sliding layers are cached in full so every chunk can be stored). Mistral / Qwen2 configs with
a ``sliding_window`` are accepted when the prompt plus the new tokens fit in the window (the window then never
applies).
"""

from __future__ import annotations

import torch

from .errors import UnsupportedModelError
from .rope import RopeInfo, check_rotation, rope_info

#: Model types whose decoder layers the chunk modes drive (tested on tiny random models of each).
CHUNK_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")

#: Attention implementations the layer-by-layer runner builds masks for.
# "infercache" and "infercache_stream" run transformers' sdpa for every cache they do not own (a plain
# DynamicCache here), so a model switched to them by compressed_cache() or a stream stays usable.
CHUNK_ATTENTION = ("sdpa", "eager", "infercache", "infercache_stream")


def text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def sliding_layers(model: torch.nn.Module) -> list[int]:
    """Indices of layers with windowed attention (``layer_types`` or an active ``sliding_window``)."""
    config = text_config(model)
    types = getattr(config, "layer_types", None)
    if types:
        return [i for i, kind in enumerate(types) if "sliding" in str(kind)]
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return list(range(int(config.num_hidden_layers)))
    return []


def check_chunk_model(model: torch.nn.Module, mode: str, total_tokens: int) -> RopeInfo:
    """Raise :class:`UnsupportedModelError` (or ``UnsupportedRopeError``) unless ``mode`` can run on ``model``."""
    config = text_config(model)
    model_type = str(getattr(config, "model_type", "?"))
    if model_type not in CHUNK_MODEL_TYPES:
        raise UnsupportedModelError(
            f"mode={mode!r} supports model types {', '.join(CHUNK_MODEL_TYPES)}; got {model_type!r}"
            + (" (hybrid sliding-window attention: a reused chunk's sliding-layer KV was computed from another window, "
               "and recomputing only those layers costs a full prefill)" if sliding_layers(model) else "")
            + ". Use mode='prefix', which is exact for any model.")
    sliding = sliding_layers(model)
    window = getattr(config, "sliding_window", None)
    if sliding and (window is None or total_tokens > int(window)):
        raise UnsupportedModelError(
            f"mode={mode!r}: {len(sliding)} of {config.num_hidden_layers} layers use sliding-window attention "
            f"(window {window}, {total_tokens} tokens); reused chunk KV cannot be repaired for them. "
            "Use mode='prefix'.")
    body = getattr(model, "model", None)
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(body, name)]
    if missing or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"mode={mode!r} needs the standard HF decoder layout (model.model.embed_tokens/layers/norm/rotary_emb and "
            f"model.lm_head); {type(model).__name__} lacks {missing or ['lm_head']}. Use mode='prefix'.")
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in CHUNK_ATTENTION:
        raise UnsupportedModelError(
            f"mode={mode!r} runs with attn_implementation 'sdpa' or 'eager'; this model uses {attn!r} "
            "(call model.set_attn_implementation('sdpa')).")
    info = rope_info(model)
    check_rotation(model)
    return info
