"""A tiny causal video DiT (built in code) and the chunk-by-chunk sampler that uses :class:`ARVideoKVCache`.

Model: frames ``(B, C, F, H, W)`` are patchified per frame (``patch x patch``), get a learned spatial position
embedding, and go through ``depth`` adaLN-Zero transformer blocks whose self-attention uses a **temporal rotary
embedding** (over frame positions, applied at attention time). Attention is causal at chunk granularity: a chunk
sees the frames before it (through the cache) and all of its own frames. Output: the flow-matching velocity.

Built in code it is random-init (mechanics tests); the trained ``video-dit-moving-digits`` checkpoint
(``scripts/diffusion/train_video_dit.py`` on :mod:`infercache.diffusion.video.moving_digits` clips) is loaded by
:func:`infercache.diffusion.video.pretrained.load_video_dit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .kv_cache import ARCacheConfig, ARVideoKVCache


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(..., n, d)`` (``d`` even) at ``positions`` ``(n,)`` (floats allowed)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None, :]  # (n, d/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class CausalVideoBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        tokens_per_cond: int | None = None,
    ) -> torch.Tensor:
        """``c``: one conditioning vector per sample ``(B, D)``, or one per group of ``tokens_per_cond`` tokens
        ``(B, G, D)`` (training: one noise level per chunk; the adaLN projection then runs once per group)."""
        mods = self.ada(c)
        mods = mods.unsqueeze(1) if tokens_per_cond is None else mods.repeat_interleave(tokens_per_cond, dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, dim=-1)
        x = self.norm1(h) * (1 + scale1) + shift1
        b, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v).transpose(1, 2).reshape(b, n, dim)
        h = h + gate1 * self.proj(a)
        x = self.norm2(h) * (1 + scale2) + shift2
        return h + gate2 * self.mlp(x)


class CausalVideoDiT(nn.Module):
    """A few-block causal video transformer; ``forward`` denoises one chunk against an :class:`ARVideoKVCache`."""

    def __init__(
        self,
        in_channels: int = 1,
        frame_size: int = 16,
        patch_size: int = 2,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if (dim // heads) % 2:
            raise ValueError("head dim must be even for the rotary embedding")
        self.in_channels, self.frame_size, self.patch_size = in_channels, frame_size, patch_size
        self.grid = (frame_size // patch_size, frame_size // patch_size)
        self.embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.grid[0] * self.grid[1], dim))
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(CausalVideoBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch_size * patch_size * in_channels)
        self.dim = dim
        if zero_init:  # adaLN-Zero, as for training; random gates (default) make untrained outputs non-trivial
            for blk in self.blocks:
                nn.init.zeros_(blk.ada.weight)
                nn.init.zeros_(blk.ada.bias)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, hh, ww = x.shape
        e = self.embed(x.transpose(1, 2).reshape(b * f, c, hh, ww))  # (B*F, D, h, w)
        e = e.flatten(2).transpose(1, 2) + self.pos  # (B*F, S, D)
        return e.reshape(b, f * self.tokens_per_frame, self.dim)

    def _untokens(self, h: torch.Tensor, f: int) -> torch.Tensor:
        b = h.shape[0]
        p, (gh, gw), c = self.patch_size, self.grid, self.in_channels
        x = h.reshape(b, f, gh, gw, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)
        return x.reshape(b, c, f, gh * p, gw * p)

    def _cond(self, timestep: torch.Tensor | float, b: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        return self.t_mlp(timestep_embedding(t, self.dim))

    def _head(self, h: torch.Tensor, c: torch.Tensor, f: int) -> torch.Tensor:
        shift, scale = self.ada_out(c).unsqueeze(1).chunk(2, dim=-1)
        return self._untokens(self.out(self.norm_out(h) * (1 + scale) + shift), f)

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor | float, cache: ARVideoKVCache | None = None, commit: bool = False
    ) -> torch.Tensor:
        """Velocity for chunk ``x`` ``(B, C, F, H, W)``, which follows the frames in ``cache``.

        ``commit=True``: the cache-write forward of the finished chunk (``x`` clean, ``timestep`` 0): every layer
        stores the chunk's pre-RoPE K/V after attending. Otherwise the cache is only read.
        """
        b, _, f = x.shape[:3]
        cache = cache if cache is not None else ARVideoKVCache(len(self.blocks), ARCacheConfig.unbounded())
        h, c = self._tokens(x), self._cond(timestep, b, x.device)
        per = self.tokens_per_frame
        if commit:
            cache.begin_commit(f)
        try:
            for i, blk in enumerate(self.blocks):

                def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i) -> torch.Tensor:
                    ck, cv, kpos, qpos = cache.context(i, q, f)
                    own = qpos.repeat_interleave(per)
                    keys = torch.cat([rope(ck, kpos), rope(k, own)], dim=2)
                    vals = torch.cat([cv, v], dim=2)
                    out = torch.nn.functional.scaled_dot_product_attention(rope(q, own), keys, vals)
                    if commit:
                        cache.write(i, k, v, self.grid)
                    return out

                h = blk(h, c, attend)
        finally:
            if commit:
                cache.end_commit()
        return self._head(h, c, f)

    def forward_full(self, clips: torch.Tensor, timesteps: list[float], chunk_frames: int) -> torch.Tensor:
        """Reference without a cache: the whole clip in one pass with a block-causal mask (chunk ``j`` sees chunks
        ``<= j``), chunk ``j`` at ``timesteps[j]``, absolute frame positions. Returns every chunk's velocity."""
        b, _, f = clips.shape[:3]
        per = self.tokens_per_frame
        n_chunks = f // chunk_frames
        if len(timesteps) != n_chunks or f % chunk_frames:
            raise ValueError("need one timestep per chunk and a whole number of chunks")
        h = self._tokens(clips)
        conds = [self._cond(t, b, clips.device) for t in timesteps]
        chunk_of = torch.arange(f * per, device=clips.device) // (chunk_frames * per)
        mask = chunk_of[None, :] <= chunk_of[:, None]  # (query, key)
        pos = (torch.arange(f * per, device=clips.device) // per).float()
        tok_cond = torch.stack(conds, dim=1).repeat_interleave(chunk_frames * per, dim=1)  # (B, N, D)
        for blk in self.blocks:
            h = _block_per_token(blk, h, tok_cond, lambda q, k, v: _masked(q, k, v, pos, mask))
        outs = [
            self._head(h[:, j * chunk_frames * per : (j + 1) * chunk_frames * per], conds[j], chunk_frames)
            for j in range(n_chunks)
        ]
        return torch.cat(outs, dim=2)


def _masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(rope(q, pos), rope(k, pos), v, attn_mask=mask)


def _block_per_token(blk: CausalVideoBlock, h: torch.Tensor, c: torch.Tensor, attend: Callable) -> torch.Tensor:
    """``blk.forward`` with a conditioning vector per token ``c`` ``(B, N, D)``."""
    shift1, scale1, gate1, shift2, scale2, gate2 = blk.ada(c).chunk(6, dim=-1)
    x = blk.norm1(h) * (1 + scale1) + shift1
    b, n, dim = x.shape
    q, k, v = blk.qkv(x).reshape(b, n, 3, blk.heads, dim // blk.heads).permute(2, 0, 3, 1, 4)
    a = attend(q, k, v).transpose(1, 2).reshape(b, n, dim)
    h = h + gate1 * blk.proj(a)
    x = blk.norm2(h) * (1 + scale2) + shift2
    return h + gate2 * blk.mlp(x)


@torch.no_grad()
def generate_video(
    model: CausalVideoDiT,
    num_chunks: int,
    chunk_frames: int = 2,
    num_steps: int = 4,
    batch_size: int = 1,
    cache_config: ARCacheConfig | None = None,
    generator: torch.Generator | None = None,
    context_noise: float = 0.0,
    on_chunk: Callable[[int, ARVideoKVCache], Any] | None = None,
) -> tuple[torch.Tensor, ARVideoKVCache]:
    """Chunk-by-chunk rectified-flow sampling (Euler, ``sigma`` 1 -> 0 in ``num_steps`` steps).

    Every denoising step of a chunk reads the same cache; after the chunk is done, one cache-write forward at
    ``timestep = 1000 * context_noise`` (0: the clean latent, as in Self-Forcing's ``context_noise: 0``) commits it.
    Returns ``(video (B, C, num_chunks * chunk_frames, H, W), cache)``.
    """
    cache = ARVideoKVCache(len(model.blocks), cache_config or ARCacheConfig())
    shape = (batch_size, model.in_channels, chunk_frames, model.frame_size, model.frame_size)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    chunks = []
    for j in range(num_chunks):
        x = torch.randn(shape, generator=generator)
        for i in range(num_steps):
            v = model(x, 1000.0 * sigmas[i], cache)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        ctx = x if context_noise == 0 else (1 - context_noise) * x + context_noise * torch.randn(
            shape, generator=generator
        )
        model(ctx, 1000.0 * context_noise, cache, commit=True)
        chunks.append(x)
        if on_chunk is not None:
            on_chunk(j, cache)
    return torch.cat(chunks, dim=2), cache
