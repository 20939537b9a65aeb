"""Finding a transformer's block list and reading / slicing the arguments that flow through it."""

from __future__ import annotations

import inspect
from typing import Any

import torch

BLOCK_LIST_NAMES = ("transformer_blocks", "blocks", "layers", "single_transformer_blocks")


def find_blocks(transformer: torch.nn.Module, name: str | None = None) -> tuple[str, torch.nn.ModuleList]:
    """The transformer's block list (``name`` or the first known attribute that is a ``ModuleList``)."""
    names = (name,) if name else BLOCK_LIST_NAMES
    for n in names:
        blocks = getattr(transformer, n, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return n, blocks
    raise ValueError(
        f"{type(transformer).__name__} has no non-empty block list named {' / '.join(names)}; "
        "pass blocks='<attribute name>' to enable_cache"
    )


def arg_index(module: torch.nn.Module, name: str, default: int) -> int:
    """Position of parameter ``name`` in ``type(module).forward`` (without ``self``), or ``default``."""
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return default
    return params.index(name) if name in params else default


def get_arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, index: int) -> Any:
    """Argument ``name`` of a call, given by keyword or at position ``index``."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (a tensor, a tuple, or a diffusers ``BaseOutput`` with ``sample``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


def wrap_like(template: Any, tensor: torch.Tensor) -> Any:
    """Rebuild an output of ``template``'s kind around ``tensor``."""
    if isinstance(template, torch.Tensor):
        return tensor
    if isinstance(template, tuple):
        return (tensor, *template[1:])
    if isinstance(template, list):
        return [tensor, *template[1:]]
    return type(template)(sample=tensor)


def slice_batch(value: Any, sl: slice | None, batch: int) -> Any:
    """``value[sl]`` for tensors whose first dim is the batch (recursing into tuples, lists and dicts)."""
    if sl is None:
        return value
    if isinstance(value, torch.Tensor):
        return value[sl] if value.ndim >= 1 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(slice_batch(v, sl, batch) for v in value)
    if isinstance(value, dict):
        return {k: slice_batch(v, sl, batch) for k, v in value.items()}
    return value


def rel_l1(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """``mean|a - b| / mean|b|``, the distance TeaCache, FBCache and EasyCache use."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().mean() / (b.abs().mean() + eps))
