"""Re-positioning stored keys: rotate post-RoPE keys by a position delta.

HF caches keys **after** RoPE. A key computed at position ``p`` is ``R(p·θ) k``; moving it to ``p + Δ`` is
``R(Δ·θ) R(p·θ) k``, i.e. applying RoPE once more with the cos/sin of ``Δ`` (half-split ``rotate_half`` layout)::

    k' = k · cos(Δθ) + rotate_half(k) · sin(Δθ)

``θ`` is the model's own ``rotary_emb.inv_freq`` (so ``linear``, ``llama3`` and ``yarn`` frequency scaling is
included), and the cos/sin are **unscaled**: YaRN's ``attention_scaling`` is already inside the stored keys, and
multiplying again would be wrong by that factor (13.9 % for YaRN factor 4, see the research notes §8). The angles are
computed in float64. Values are position-independent and are never touched.

Refused with :class:`UnsupportedRopeError`: ``dynamic`` NTK and ``longrope`` (their frequencies change with the
sequence length, so a stored key's rotation depends on the request it came from), ``proportional`` and any type not
listed in :data:`SUPPORTED_ROPE_TYPES`, partial rotary (``partial_rotary_factor < 1`` or fewer frequencies than
``head_dim / 2``), and models without a ``rotary_emb.inv_freq`` (M-RoPE, ALiBi, learned positions...).

Like LMCache's blender, :func:`check_rotation` self-tests the rotation on the model (first layer) before a chunk mode
uses it: keys encoded at positions ``p`` and rotated by ``Δ`` must match the keys encoded at ``p + Δ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .errors import UnsupportedRopeError

#: RoPE types whose frequencies are static, so a delta rotation with ``inv_freq`` is exact.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

#: Relative error allowed by :func:`check_rotation` (HF computes angles in float32: ~1e-7·position rad of noise).
ROTATION_CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class RopeInfo:
    """What the rotation needs: the frequencies, the RoPE type and the (already applied) attention scaling."""

    rope_type: str
    inv_freq: torch.Tensor  # [head_dim / 2], float64
    attention_scaling: float
    head_dim: int


def find_rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The model's shared rotary embedding module (``model.model.rotary_emb`` on HF decoder-only models)."""
    body = getattr(model, "model", None)
    rotary = getattr(body, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedRopeError(
            f"{type(model).__name__}: no rotary embedding with a static `inv_freq` found at `model.model.rotary_emb`; "
            "chunk reuse needs RoPE keys it can re-rotate (M-RoPE, ALiBi and learned positions are not supported). "
            "Use mode='prefix', which is exact for any model.")
    return rotary


def rope_info(model: torch.nn.Module) -> RopeInfo:
    """Check that the model's RoPE can be re-rotated by a delta and return its frequencies, else raise."""
    config = model.config.get_text_config(decoder=True)
    rotary = find_rotary_embedding(model)
    rope_type = getattr(rotary, "rope_type", None)
    if isinstance(rope_type, dict):  # per-layer-type RoPE (Gemma-3): hybrid attention, refused elsewhere too
        raise UnsupportedRopeError(
            f"{type(model).__name__}: per-layer-type RoPE {rope_type} (hybrid sliding/full attention) is not supported "
            "by chunk reuse; use mode='prefix'.")
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = str(rope_type or params.get("rope_type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = {"dynamic": "dynamic NTK recomputes its frequencies from the sequence length",
               "longrope": "LongRoPE switches between short and long frequency factors with the sequence length",
               }.get(rope_type, "its delta rotation has not been verified")
        raise UnsupportedRopeError(
            f"RoPE type {rope_type!r} is not supported by chunk reuse ({why}); supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}. Use mode='prefix', which is exact for any RoPE.")
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    inv_freq = rotary.inv_freq.detach().to("cpu", torch.float64)
    if (factor is not None and float(factor) < 1.0) or inv_freq.numel() * 2 != head_dim:
        raise UnsupportedRopeError(
            f"partial rotary embeddings are not supported by chunk reuse (partial_rotary_factor={factor}, "
            f"{inv_freq.numel()} frequencies for head_dim {head_dim}); use mode='prefix'.")
    return RopeInfo(rope_type=rope_type, inv_freq=inv_freq,
                    attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)), head_dim=head_dim)


def delta_cos_sin(delta: int | torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled ``cos``/``sin`` of ``Δ·θ`` in float64, laid out ``[..., head_dim]`` like HF (``cat(f, f)``)."""
    delta = torch.as_tensor(delta, dtype=torch.float64)
    freqs = delta[..., None] * inv_freq.to(torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_keys(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE ``keys`` (``[..., tokens, head_dim]``) by ``delta`` positions (an int, or one per token).

    Computed in float64 and cast back to the keys' dtype. ``delta == 0`` returns ``keys`` unchanged.
    """
    if isinstance(delta, int) and delta == 0:
        return keys
    cos, sin = delta_cos_sin(delta, inv_freq)
    if cos.dim() == 1:  # one delta for all tokens
        cos, sin = cos[None, :], sin[None, :]
    wide = keys.to(torch.float64)
    return (wide * cos + rotate_half(wide) * sin).to(keys.dtype)


def layer0_keys(model: torch.nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """First-layer keys (post-RoPE, ``[kv_heads, tokens, head_dim]``) of ``ids`` encoded at positions ``start...``."""
    cache = DynamicCache()
    positions = torch.arange(start, start + ids.numel(), device=ids.device)[None]
    with torch.no_grad():
        model(ids.reshape(1, -1), cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return cache.layers[0].keys[0]


def check_rotation(model: torch.nn.Module, *, delta: int = 37, tokens: int = 6,
                   tolerance: float = ROTATION_CHECK_TOLERANCE) -> float:
    """Self-test (cached on the model): rotate first-layer keys by ``delta`` and compare with re-encoding there.

    Returns the relative error; raises :class:`UnsupportedRopeError` above ``tolerance`` (the model's attention
    must then be doing something to keys that a plain RoPE rotation does not reproduce).
    """
    cached = getattr(model, "_infercache_rotation_check", None)
    if cached is not None:
        return cached
    info = rope_info(model)
    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    ids = (torch.arange(tokens, device=device) * 7919 + 3) % max(vocab - 1, 1) + 1
    start = 5
    here = layer0_keys(model, ids, start).double()
    there = layer0_keys(model, ids, start + delta).double()
    moved = rotate_keys(here, delta, info.inv_freq)
    error = float((moved - there).norm() / there.norm().clamp_min(1e-30))
    if error > tolerance:
        raise UnsupportedRopeError(
            f"{type(model).__name__}: keys rotated by {delta} positions differ from keys encoded there by "
            f"{error:.2e} (relative) > {tolerance:.0e}; this model's positional encoding is not a plain RoPE "
            "rotation of cached keys. Use mode='prefix'.")
    model._infercache_rotation_check = error
    return error
