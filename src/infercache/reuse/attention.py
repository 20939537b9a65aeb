"""A registered attention function that lets a reuse mode observe or replace attention for one call.

transformers looks attention functions up by ``config._attn_implementation``. :func:`hooked_attention` registers
``"infercache_reuse"`` once, points the model's config at it for the duration of a ``with`` block, and restores the
original name afterwards. Inside the block every attention call goes to the hooks of the active context:

* ``observe(module, query, key, value, kwargs)`` sees the post-RoPE queries and the full keys after the model's own
  attention ran (Cache-Craft statistics);
* ``replace(module, query, key, value, kwargs)`` computes attention itself (APE's split attention).

Not thread-safe for one model object (the config is shared); separate models can run concurrently.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

NAME = "infercache_reuse"

Observer = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]], None]
Replacer = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]],
                    tuple[torch.Tensor, Any]]


@dataclass
class _Hooks:
    original: str
    observe: Observer | None
    replace: Replacer | None


_ACTIVE: ContextVar[_Hooks | None] = ContextVar("infercache_reuse_attention", default=None)
_registered = False


def base_attention(module: torch.nn.Module, implementation: str) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention function ``module`` would use under ``implementation`` (its own modeling file's eager one)."""
    if implementation == "eager":
        modeling = sys.modules.get(type(module).__module__)
        function = getattr(modeling, "eager_attention_forward", None)
        if function is None:  # pragma: no cover - every supported modeling file defines one
            from transformers.models.llama.modeling_llama import eager_attention_forward as function
        return function
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    hooks = _ACTIVE.get()
    if hooks is None:
        raise RuntimeError(f"attention implementation {NAME!r} is only usable inside infercache.reuse")
    if hooks.replace is not None:
        return hooks.replace(module, query, key, value, kwargs)
    output = base_attention(module, hooks.original)(module, query, key, value, attention_mask, **kwargs)
    if hooks.observe is not None:
        hooks.observe(module, query, key, value, {**kwargs, "attention_mask": attention_mask})
    return output


@contextmanager
def hooked_attention(model: torch.nn.Module, *, observe: Observer | None = None,
                     replace: Replacer | None = None) -> Iterator[None]:
    """Route ``model``'s attention through ``observe`` / ``replace`` inside the block."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, _attention)
        _registered = True
    config = model.config
    original = config._attn_implementation or "eager"
    if original == NAME:
        raise RuntimeError("hooked_attention blocks cannot be nested on one model")
    token = _ACTIVE.set(_Hooks(original=original, observe=observe, replace=replace))
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = original
        _ACTIVE.reset(token)


def original_implementation(model: torch.nn.Module) -> str:
    """The attention implementation name in effect outside any :func:`hooked_attention` block."""
    hooks = _ACTIVE.get()
    name = model.config._attn_implementation or "eager"
    return hooks.original if name == NAME and hooks is not None else name
