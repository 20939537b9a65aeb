"""The model's own rotary embedding, used to take RoPE off incoming keys and put it back at new positions.

Stream caches hold keys **before RoPE** (StreamingLLM's way, https://arxiv.org/abs/2309.17453): HF attention
modules rotate keys before ``cache.update``, so the cache un-rotates them with the cos/sin of the positions they
were rotated at, and rotates the held keys again at their current (re-positioned) cache positions on every forward.
No per-model code: cos/sin come from the model's ``rotary_emb`` module (per layer type for Gemma-3; 3-D M-RoPE
positions for Qwen2-VL-style models, whose module already merges the t/h/w sections). Partial rotary (the first
``cos.shape[-1]`` channels) and YaRN-style ``attention_scaling`` (folded into cos/sin; the inverse divides by
``cos² + sin²``) are handled. Rotations run in float32 and are cast back to the cache dtype.
"""

from __future__ import annotations

import inspect

import torch

from ..compress import UnsupportedModelError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` with ``cos``/``sin`` ``[T, R]`` (first ``R`` channels; the rest pass through).

    ``inverse=True`` takes the rotation off: ``(x·cos − rotate_half(x)·sin) / (cos² + sin²)``.
    """
    if x.shape[-2] == 0:
        return x
    r = cos.shape[-1]
    wide = x.float()
    rot, rest = wide[..., :r], wide[..., r:]
    if inverse:
        out = (rot * cos - rotate_half(rot) * sin) / (cos * cos + sin * sin)
    else:
        out = rot * cos + rotate_half(rot) * sin
    if rest.shape[-1]:
        out = torch.cat([out, rest], dim=-1)
    return out.to(x.dtype)


class Rotary:
    """``cos_sin(positions, layer_type)`` from the model's rotary embedding; ``dims`` is 1, or 3 for M-RoPE."""

    def __init__(self, model: torch.nn.Module):
        found = [(name, m) for name, m in model.named_modules() if name.endswith("rotary_emb")]
        if not found:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no rotary embedding (`rotary_emb`): stream caches re-position keys with "
                "RoPE, so they need a RoPE model (Llama, Qwen2/3, Qwen2-VL, Mistral, Phi-3, Gemma-3, ...)"
            )
        self.module = found[0][1]
        self.takes_layer_type = "layer_type" in inspect.signature(self.module.forward).parameters
        config = model.config.get_text_config(decoder=True)
        params = getattr(config, "rope_parameters", None) or {}
        mrope = getattr(self.module, "mrope_section", None)
        if mrope is None and isinstance(params, dict):
            mrope = params.get("mrope_section")
        self.dims = 3 if mrope is not None else 1
        try:
            self.device = next(model.parameters()).device
        except StopIteration:  # pragma: no cover - a model always has parameters
            self.device = torch.device("cpu")

    @torch.no_grad()
    def cos_sin(self, positions: torch.Tensor, layer_type: str = "full_attention") -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``cos``, ``sin`` ``[T, R]`` for positions ``[T]`` (or ``[3, T]`` with M-RoPE)."""
        positions = positions.to(self.device)
        if self.dims == 1:
            if positions.dim() != 1:
                raise ValueError(f"this model takes 1-D positions, got shape {tuple(positions.shape)}")
            pos = positions[None]
        else:
            if positions.dim() != 2 or positions.shape[0] != 3:
                raise ValueError(f"an M-RoPE model takes [3, T] positions, got shape {tuple(positions.shape)}")
            pos = positions[:, None]
        dummy = torch.zeros(1, dtype=torch.float32, device=self.device)
        if self.takes_layer_type:
            cos, sin = self.module(dummy, pos, layer_type)
        else:
            cos, sin = self.module(dummy, pos)
        return cos.reshape(-1, cos.shape[-1]).float(), sin.reshape(-1, sin.shape[-1]).float()
