"""The store namespace of a (model, tokenizer) pair: stored KV is valid only for exactly this model setup.

:func:`namespace_for` fills :class:`infercache.store.Namespace` with the model id, a hash of a few weight tensors
(cached on the model, recomputed when one of them is modified in place), the dtype, the layer / KV-head / head_dim
shapes, the RoPE and attention-window fields of the config, and a hash of the tokenizer (cached on the tokenizer).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..store import Namespace
from ..store.keys import canonical_json
from .segments import adds_bos

#: How many parameter tensors the weights hash covers (first, last and evenly spaced ones in between).
WEIGHT_TENSORS_HASHED = 4

_WEIGHTS_ATTR = "_infercache_weights_hash"
_TOKENIZER_ATTR = "_infercache_tokenizer_hash"
_WINDOW_FIELDS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "sliding_window_pattern",
                  "attn_logit_softcapping", "query_pre_attn_scalar")


def weights_hash(model: torch.nn.Module, tensors: int = WEIGHT_TENSORS_HASHED) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``tensors`` parameters spread over the model.

    Cached on the model; the cache is keyed by each hashed tensor's storage pointer and in-place version counter, so
    loading other weights into the same module (``load_state_dict``, ``copy_``) gives a new hash.
    """
    named = [(name, p) for name, p in model.named_parameters()]
    if not named:
        raise ValueError("model has no parameters to hash")
    picks = sorted({round(i * (len(named) - 1) / max(tensors - 1, 1)) for i in range(tensors)})
    chosen = [named[i] for i in picks]
    signature = tuple((name, p.data_ptr(), p._version, tuple(p.shape), str(p.dtype)) for name, p in chosen)
    cached = getattr(model, _WEIGHTS_ATTR, None)
    if cached is not None and cached[0] == signature:
        return cached[1]
    digest = hashlib.sha256(b"infercache/weights\x00")
    for name, param in chosen:
        data = param.detach().to("cpu").contiguous()
        digest.update(canonical_json([name, list(data.shape), str(data.dtype)]).encode("ascii"))
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy())
    value = digest.hexdigest()
    setattr(model, _WEIGHTS_ATTR, (signature, value))
    return value


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 over the tokenizer's full serialized state (vocab, merges, normalizer...), special tokens and chat
    template. Cached on the tokenizer (keyed by its length, so added tokens invalidate it)."""
    size = len(tokenizer)
    cached = getattr(tokenizer, _TOKENIZER_ATTR, None)
    if cached is not None and cached[0] == size:
        return cached[1]
    digest = hashlib.sha256(b"infercache/tokenizer\x00")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:  # slow tokenizer: the vocabulary is what we can reach in general
        digest.update(canonical_json(sorted(tokenizer.get_vocab().items())).encode("ascii"))
    extras = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": str(getattr(tokenizer, "chat_template", None) or ""),
        "size": size,
        "bos": adds_bos(tokenizer),
    }
    digest.update(canonical_json(extras).encode("ascii"))
    value = digest.hexdigest()
    try:
        setattr(tokenizer, _TOKENIZER_ATTR, (size, value))
    except AttributeError:  # pragma: no cover - exotic tokenizer objects with __slots__
        pass
    return value


def model_id_of(model: torch.nn.Module) -> str:
    """``config._name_or_path`` when set, else ``<model_type>:<architecture>``."""
    config = model.config
    name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    if name:
        return str(name)
    arch = ",".join(getattr(config, "architectures", None) or [type(model).__name__])
    return f"{config.model_type}:{arch}"


def namespace_for(model: torch.nn.Module, tokenizer: Any, *, model_id: str | None = None,
                  tenant_salt: str | None = None) -> Namespace:
    """The :class:`~infercache.store.Namespace` of KV produced by ``model`` on ids from ``tokenizer``.

    Covers: model id (``model_id`` overrides ``config._name_or_path``), weights hash (:func:`weights_hash`), dtype,
    layers / KV heads / head_dim, RoPE fields (``rope_parameters``, ``rope_scaling``, ``rope_theta``,
    ``partial_rotary_factor``, ``max_position_embeddings``), the attention-window fields (``sliding_window``,
    ``layer_types``...) and the tokenizer hash. ``tenant_salt`` isolates tenants sharing a store.
    """
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    base = Namespace.from_config(config, model_id=model_id or model_id_of(model), weights_hash=weights_hash(model),
                                 dtype=dtype, tokenizer_hash=tokenizer_hash(tokenizer), tenant_salt=tenant_salt)
    rope = dict(base.rope)
    window = {name: getattr(config, name) for name in _WINDOW_FIELDS if getattr(config, name, None) is not None}
    if window:
        rope["attention"] = window
    rope["model_type"] = str(config.model_type)
    return Namespace(model_id=base.model_id, weights_hash=base.weights_hash, dtype=base.dtype,
                     num_layers=base.num_layers, num_kv_heads=base.num_kv_heads, head_dim=base.head_dim, rope=rope,
                     tokenizer_hash=base.tokenizer_hash, tenant_salt=tenant_salt)
