"""Autoregressive video diffusion: a sink / compressed-mid / recent KV cache shared across denoising steps, a tiny
causal video transformer to exercise it, and a moving-digits clip generator (see ``docs/diffusion.md``)."""

from .kv_cache import ARCacheConfig, ARVideoKVCache, Segment, max_cache_tokens
from .model import CausalVideoDiT, generate_video, rope
from .moving_digits import MovingDigits, moving_digits
from .pretrained import load_video_dit, save_video_grid, video_quality
from .wan import WanARContext, WanARKVAttnProcessor, wan_forward_block_causal, wan_generate_chunk, wan_generate_video

__all__ = [
    "ARCacheConfig",
    "ARVideoKVCache",
    "CausalVideoDiT",
    "MovingDigits",
    "Segment",
    "generate_video",
    "load_video_dit",
    "max_cache_tokens",
    "moving_digits",
    "rope",
    "save_video_grid",
    "video_quality",
    "WanARContext",
    "WanARKVAttnProcessor",
    "wan_forward_block_causal",
    "wan_generate_chunk",
    "wan_generate_video",
]
