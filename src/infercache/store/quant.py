"""Lossy int8 absmax quantization of KV tensors, one scale per (head, token)."""

from __future__ import annotations

import torch

INT8_MAX = 127
#: Name recorded in blob metadata for this scheme.
INT8_SCHEME = "absmax-per-head-token"


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[kv_heads, tokens, head_dim]`` to int8 with a float32 scale per (head, token).

    ``x ≈ q * scale[..., None]`` with ``|x - q * scale| <= scale / 2 = absmax / 254`` element-wise.
    Raises ``ValueError`` on NaN/inf, which absmax scaling cannot represent.
    """
    values = x.detach().to(torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("int8 quantization needs finite values; this KV tensor contains NaN or inf")
    scale = values.abs().amax(dim=-1) / INT8_MAX
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(values / divisor.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized.contiguous(), scale.contiguous()


def dequantize_int8(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`, cast to ``dtype``."""
    return (quantized.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)
