"""Binding :class:`ARVideoKVCache` to diffusers' ``WanTransformer3DModel`` for chunk-by-chunk causal generation.

The diffusers way: a custom self-attention processor (:class:`WanARKVAttnProcessor`) installed on every block's
``attn1`` with ``set_attn_processor`` (cross-attention ``attn2`` keeps its stock processor), driven by a context
object (:class:`WanARContext`) that tells the processors the token grid of the chunk and whether the forward is a
cache-write (commit) forward. No model code is patched; :meth:`WanARContext.remove` restores the processors that
were installed before, so the stock model comes back bit for bit.

Per block, for a chunk of ``f`` post-patch frames (``h x w`` tokens each) that follows the frames in the cache:

* queries and the chunk's own keys get Wan's 3-D rotary embedding (``t | h | w`` channel split) with the
  **temporal** part taken at the positions the cache gives (``"absolute"``: frame offset of the chunk;
  ``"rebased"``: right after the kept frames); the spatial parts are the stock ones;
* cached keys are stored with the **spatial** rotation already applied and the temporal channels unrotated; the
  temporal rotation is applied at attention time at the cached frames' (absolute or rebased) positions. The two
  rotations act on disjoint channel pairs, so this equals applying the full 3-D rotation at once;
* attention is over ``[cached keys ; chunk keys]`` (chunk-causal: a chunk sees earlier chunks and all of itself);
* on a commit forward (the finished, clean chunk, timestep 0 by default) each block writes the chunk's K/V once;
  denoising forwards only read, so the cache is shared by every denoising step of the next chunk (CausVid /
  Self-Forcing style, as :func:`infercache.diffusion.video.generate_video` does for ``CausalVideoDiT``).

:func:`wan_forward_block_causal` is the cache-free reference: the stock processor with a block-causal mask over the
whole clip, per-token timesteps (chunk ``j`` at ``timesteps[j]``).

Limits: self-attention K/V caching only; image conditioning (I2V: ``image_dim`` / ``added_kv_proj_dim``), attention
masks, context parallelism and use of the processor on cross-attention are rejected with an error. Temporal positions
are looked up in the model's RoPE table, so they must stay below ``rope_max_seq_len`` (``"rebased"`` keeps them
bounded). Random-init tiny configs only exercise the mechanics: no quality claim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .kv_cache import ARCacheConfig, ARVideoKVCache


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation of diffusers' ``WanAttnProcessor`` (interleaved pairs), ``x`` ``(B, N, heads, D)``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def _check_model(model: Any) -> None:
    cfg = model.config
    if getattr(cfg, "image_dim", None) is not None or getattr(cfg, "added_kv_proj_dim", None) is not None:
        raise ValueError(
            "WanARContext does not support image conditioning (I2V: image_dim / added_kv_proj_dim); "
            "use a text-to-video WanTransformer3DModel"
        )
    if not hasattr(model, "rope") or not hasattr(model.rope, "t_dim"):
        raise ValueError("expected a diffusers WanTransformer3DModel (with a WanRotaryPosEmbed `rope`)")
    if model.rope.t_dim <= 0 or model.rope.t_dim % 2:
        raise ValueError(f"temporal RoPE dim must be positive and even, got {model.rope.t_dim}")


@dataclass
class _ARState:
    """Shared by the processors of one model: the cache, the current chunk's grid and the commit flag."""

    cache: ARVideoKVCache
    rope: Any  # the model's WanRotaryPosEmbed (its tables give temporal cos/sin at integer positions)
    grid: tuple[int, int, int] | None = None  # (frames, h, w) post-patch, set by WanARContext for each forward
    commit: bool = False
    last_positions: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def temporal(self, pos: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Temporal cos/sin rows ``(n, t_dim)`` at integer positions ``pos``."""
        t = self.rope.t_dim
        table_len = self.rope.freqs_cos.shape[0]
        if pos.numel() and (pos.min() < 0 or pos.max() >= table_len):
            raise ValueError(
                f"temporal position {int(pos.max())} is outside the model's RoPE table (rope_max_seq_len="
                f"{table_len}); use ARCacheConfig(positions='rebased') or a larger rope_max_seq_len"
            )
        if pos.numel() and not torch.equal(pos, pos.round()):
            raise ValueError("temporal positions must be integers")
        idx = pos.long().to(self.rope.freqs_cos.device)
        return self.rope.freqs_cos[idx, :t].to(device), self.rope.freqs_sin[idx, :t].to(device)


class WanARKVAttnProcessor:
    """Self-attention processor for ``WanAttention`` (``attn1``) that attends to an :class:`ARVideoKVCache`.

    Installed by :class:`WanARContext`; ``layer`` is the block index (the cache layer)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, state: _ARState) -> None:
        self.layer = layer
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or getattr(attn, "is_cross_attention", False):
            raise ValueError(
                "WanARKVAttnProcessor caches self-attention K/V only; it cannot serve cross-attention (attn2). "
                "Install it with WanARContext, which puts it on the attn1 layers only"
            )
        if attn.add_k_proj is not None:
            raise ValueError("WanARKVAttnProcessor does not support image conditioning (added K/V projections)")
        if attention_mask is not None:
            raise ValueError("WanARKVAttnProcessor builds its own chunk-causal attention; attention_mask must be None")
        if self._parallel_config is not None:
            raise ValueError("WanARKVAttnProcessor does not support context parallelism")
        st = self.state
        if st.grid is None:
            raise RuntimeError("WanARKVAttnProcessor called outside WanARContext (no chunk grid set)")
        if rotary_emb is None:
            raise ValueError("WanARKVAttnProcessor needs the model's rotary embedding")
        f, gh, gw = st.grid
        per = gh * gw
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, N, heads, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if query.shape[1] != f * per:
            raise ValueError(f"chunk has {query.shape[1]} tokens, expected {f} x {gh} x {gw}")

        t = st.rope.t_dim
        cos, sin = rotary_emb  # (1, N, 1, D): temporal positions 0..f-1 of the chunk, stock spatial positions
        ck, cv, kpos, qpos = st.cache.context(self.layer, query.transpose(1, 2), f)
        st.last_positions[self.layer] = (kpos.detach().cpu(), qpos.detach().cpu())

        # the chunk: stock spatial rotation, temporal rotation at the cache's query positions
        qc, qs = st.temporal(qpos, cos.device)
        cos_q, sin_q = cos.clone(), sin.clone()
        cos_q[..., :t] = qc.repeat_interleave(per, dim=0)[None, :, None, :]
        sin_q[..., :t] = qs.repeat_interleave(per, dim=0)[None, :, None, :]
        q_rot = _rotate(query, cos_q, sin_q)
        k_rot = _rotate(key, cos_q, sin_q)

        if ck.shape[2]:
            kc, ks = st.temporal(kpos, cos.device)
            n = kc.shape[0]
            cos_k = torch.ones(1, n, 1, cos.shape[-1], dtype=cos.dtype, device=cos.device)
            sin_k = torch.zeros(1, n, 1, sin.shape[-1], dtype=sin.dtype, device=sin.device)
            cos_k[..., :t] = kc[None, :, None, :]
            sin_k[..., :t] = ks[None, :, None, :]
            cached_k = _rotate(ck.transpose(1, 2).to(key.dtype), cos_k, sin_k)  # temporal rotation only
            keys = torch.cat([cached_k, k_rot], dim=1)
            values = torch.cat([cv.transpose(1, 2).to(value.dtype), value], dim=1)
        else:
            keys, values = k_rot, value

        out = dispatch_attention_fn(
            q_rot, keys, values, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )
        if st.commit:
            # stored: spatial rotation applied, temporal channels unrotated (rotated at read time)
            cos_s, sin_s = cos.clone(), sin.clone()
            cos_s[..., :t] = 1.0
            sin_s[..., :t] = 0.0
            k_sp = _rotate(key, cos_s, sin_s)
            st.cache.write(self.layer, k_sp.transpose(1, 2).contiguous(), value.transpose(1, 2).contiguous(), (gh, gw))
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class WanARContext:
    """Installs :class:`WanARKVAttnProcessor` on a ``WanTransformer3DModel``'s self-attention layers and runs
    chunk forwards against one :class:`ARVideoKVCache` (one video stream).

    ``ctx(latents, timestep, encoder_hidden_states)`` denoises a chunk (reads the cache);
    ``ctx.commit(clean_latents, encoder_hidden_states)`` is the cache-write forward of the finished chunk.
    Use as a context manager or call :meth:`remove` to restore the previous processors."""

    def __init__(
        self, model: Any, cache_config: ARCacheConfig | None = None, cache: ARVideoKVCache | None = None
    ) -> None:
        _check_model(model)
        self.model = model
        self.cache = cache if cache is not None else ARVideoKVCache(len(model.blocks), cache_config or ARCacheConfig())
        if len(self.cache.layers) != len(model.blocks):
            raise ValueError(f"cache has {len(self.cache.layers)} layers, model has {len(model.blocks)} blocks")
        self.state = _ARState(self.cache, model.rope)
        self._saved: dict[str, Any] | None = None
        self.install()

    # -- processors ---------------------------------------------------------------------------------------------
    def install(self) -> None:
        if self._saved is not None:
            return
        saved = dict(self.model.attn_processors)
        procs = dict(saved)
        for i in range(len(self.model.blocks)):
            name = f"blocks.{i}.attn1.processor"
            if name not in procs:
                raise ValueError(f"model has no self-attention processor {name!r}")
            procs[name] = WanARKVAttnProcessor(i, self.state)
        self.model.set_attn_processor(procs)
        self._saved = saved

    def remove(self) -> None:
        """Put back the processors that were installed before (the stock ones, usually)."""
        if self._saved is None:
            return
        self.model.set_attn_processor(dict(self._saved))
        self._saved = None

    @property
    def installed(self) -> bool:
        return self._saved is not None

    def __enter__(self) -> WanARContext:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def last_positions(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the ``(key_positions, query_frame_positions)`` used by the last forward."""
        return self.state.last_positions

    # -- forwards -----------------------------------------------------------------------------------------------
    def __call__(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        commit: bool = False,
    ) -> torch.Tensor:
        """The model's output for chunk ``latents`` ``(B, C, F, H, W)``, which follows the frames in the cache."""
        if not self.installed:
            raise RuntimeError("WanARContext was removed; call install() first")
        b, _, fr, hh, ww = latents.shape
        p_t, p_h, p_w = self.model.config.patch_size
        if fr % p_t or hh % p_h or ww % p_w:
            raise ValueError(f"latent shape {tuple(latents.shape)} is not divisible by patch size {(p_t, p_h, p_w)}")
        ts = torch.as_tensor(timestep, device=latents.device)
        if ts.ndim == 0:
            ts = ts.expand(b)
        self.state.grid = (fr // p_t, hh // p_h, ww // p_w)
        self.state.commit = commit
        if commit:
            self.cache.begin_commit(fr // p_t)
        try:
            out = self.model(latents, ts, encoder_hidden_states, return_dict=False)[0]
        finally:
            if commit:
                self.cache.end_commit()
            self.state.grid = None
            self.state.commit = False
        return out

    def commit(
        self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor | float = 0.0
    ) -> torch.Tensor:
        """Cache-write forward of the finished chunk (clean latent, timestep 0 by default): one write per layer."""
        return self(latents, timestep, encoder_hidden_states, commit=True)


@torch.no_grad()
def wan_generate_chunk(
    ctx: WanARContext,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    num_steps: int = 4,
    context_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise one chunk from ``noise`` (rectified flow, Euler, ``sigma`` 1 -> 0 in ``num_steps`` steps, timestep
    ``1000 * sigma``; every step reads the same cache), then commit it (timestep ``1000 * context_noise``)."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    x = noise
    for i in range(num_steps):
        v = ctx(x, 1000.0 * float(sigmas[i]), encoder_hidden_states)
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    ctx_latent = x
    if context_noise:
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        ctx_latent = (1 - context_noise) * x + context_noise * eps
    ctx.commit(ctx_latent, encoder_hidden_states, 1000.0 * context_noise)
    return x


@torch.no_grad()
def wan_generate_video(
    model: Any,
    encoder_hidden_states: torch.Tensor,
    num_chunks: int,
    chunk_frames: int,
    height: int,
    width: int,
    num_steps: int = 4,
    cache_config: ARCacheConfig | None = None,
    generator: torch.Generator | None = None,
    on_chunk: Callable[[int, ARVideoKVCache], Any] | None = None,
) -> tuple[torch.Tensor, ARVideoKVCache]:
    """Chunk-by-chunk generation with a ``WanTransformer3DModel``; returns ``(latents (B, C, F, H, W), cache)``.
    The model's processors are restored on return."""
    p = next(model.parameters())
    b = encoder_hidden_states.shape[0]
    shape = (b, model.config.in_channels, chunk_frames, height, width)
    chunks = []
    with WanARContext(model, cache_config) as ctx:
        for j in range(num_chunks):
            noise = torch.randn(shape, generator=generator).to(device=p.device, dtype=p.dtype)
            chunks.append(wan_generate_chunk(ctx, noise, encoder_hidden_states, num_steps))
            if on_chunk is not None:
                on_chunk(j, ctx.cache)
    return torch.cat(chunks, dim=2), ctx.cache


class _BlockCausalWanProcessor:
    """The stock ``WanAttnProcessor`` with a fixed attention mask (reference only)."""

    def __init__(self, mask: torch.Tensor) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.inner = WanAttnProcessor()
        self.mask = mask

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


@torch.no_grad()
def wan_forward_block_causal(
    model: Any,
    latents: torch.Tensor,
    timesteps: list[float],
    encoder_hidden_states: torch.Tensor,
    chunk_frames: int,
) -> torch.Tensor:
    """Cache-free reference: one stock forward over the whole clip with a block-causal self-attention mask (chunk
    ``j`` sees chunks ``<= j``), chunk ``j`` at ``timesteps[j]`` (per-token timesteps), absolute frame positions."""
    _check_model(model)
    b, _, fr, hh, ww = latents.shape
    p_t, p_h, p_w = model.config.patch_size
    n_chunks = fr // chunk_frames
    if fr % chunk_frames or len(timesteps) != n_chunks or chunk_frames % p_t:
        raise ValueError("need one timestep per chunk, a whole number of chunks and chunk_frames % p_t == 0")
    per_chunk = (chunk_frames // p_t) * (hh // p_h) * (ww // p_w)
    n = n_chunks * per_chunk
    chunk_of = torch.arange(n, device=latents.device) // per_chunk
    mask = (chunk_of[None, :] <= chunk_of[:, None])[None, None]  # (1, 1, query, key)
    ts = torch.tensor(timesteps, dtype=torch.float32, device=latents.device).repeat_interleave(per_chunk)
    saved = dict(model.attn_processors)
    procs = dict(saved)
    for i in range(len(model.blocks)):
        procs[f"blocks.{i}.attn1.processor"] = _BlockCausalWanProcessor(mask)
    model.set_attn_processor(procs)
    try:
        return model(latents, ts[None].expand(b, n), encoder_hidden_states, return_dict=False)[0]
    finally:
        model.set_attn_processor(dict(saved))
