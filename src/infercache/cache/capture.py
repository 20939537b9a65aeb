"""Input capture: forward pre-hooks on each decoder layer and its attention module, installed once per model.

Some caches need what a layer reads, not only the K/V it writes: KV-Direct checkpoints a layer's input (the
residual stream) or its attention input and recomputes K/V from it; retention gates score each new token from
its attention input (the hidden state after the layer's input norm). The hooks read the hidden states, the
position ids and the cache handed to the module, and pass them to the cache's ``capture_layer_input`` or
``capture_attention_input(layer_idx, hidden, position_ids)`` when the cache has that method. With any other
cache (or none) they do nothing, so plain use of the model is unchanged. No model code is patched.
"""

from __future__ import annotations

import torch

_HOOKS_ATTR = "_infercache_input_hooks"


def decoder_layers(model) -> dict[int, torch.nn.Module]:
    """``{layer_idx: decoder layer}`` for every module with a ``self_attn`` that carries a ``layer_idx``."""
    layers = {}
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        if isinstance(attn, torch.nn.Module) and hasattr(attn, "layer_idx"):
            layers[attn.layer_idx] = module
    return layers


def attention_modules(model) -> list[torch.nn.Module]:
    """The attention modules (``self_attn`` with a ``layer_idx``), in layer order."""
    return [layer.self_attn for _, layer in sorted(decoder_layers(model).items())]


def _hook(method: str, layer_idx_of):
    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        capture = getattr(cache, method, None)
        if capture is not None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            capture(layer_idx_of(module), hidden, kwargs.get("position_ids"))

    return hook


_LAYER_HOOK = _hook("capture_layer_input", lambda module: module.self_attn.layer_idx)
_ATTENTION_HOOK = _hook("capture_attention_input", lambda module: module.layer_idx)


def install_input_capture(model) -> None:
    """Register the capture hooks on ``model`` (idempotent)."""
    if getattr(model, _HOOKS_ATTR, None):
        return
    handles = []
    for layer in decoder_layers(model).values():
        handles.append(layer.register_forward_pre_hook(_LAYER_HOOK, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(_ATTENTION_HOOK, with_kwargs=True))
    if not handles:
        raise NotImplementedError(f"{type(model).__name__}: no decoder layers with self_attn.layer_idx to capture from")
    object.__setattr__(model, _HOOKS_ATTR, handles)


def remove_input_capture(model) -> None:
    """Remove the capture hooks (the caches that need them install them again when built)."""
    for handle in getattr(model, _HOOKS_ATTR, None) or ():
        handle.remove()
    if hasattr(model, _HOOKS_ATTR):
        object.__delattr__(model, _HOOKS_ATTR)
