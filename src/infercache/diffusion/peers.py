"""Peer caches on our models, for the benchmark: diffusers' own hooks and cache-dit's DBCache.

Each peer is enabled through its library's public entry point; the adapter here only supplies what that entry
point expects from a diffusers *pipeline* and our ``sample()`` loop does not provide:

* **diffusers hooks** (``apply_first_block_cache``, ``apply_mag_cache``, ``apply_taylorseer_cache``,
  ``apply_pyramid_attention_broadcast``, ``apply_faster_cache``) read their state from a *cache context* that a
  diffusers pipeline sets around each transformer call (``with transformer.cache_context("cond"): ...``).
  ``DiTTransformer2DModel`` has no ``CacheMixin`` and our loop sets no context, so the adapter registers a torch
  forward pre-hook on the transformer that sets ``CacheContext("cond", step_index, num_inference_steps,
  timestep)`` before every call (one batched CFG call per step, like diffusers' ``DiTPipeline``), resets the
  hooks' state when a new trajectory starts (timestep goes up, or ``num_inference_steps`` calls are done), and
  feeds PAB / FasterCache their ``current_timestep_callback``. After enabling it invalidates diffusers' cached
  child-registry list (the staleness of diffusers#14037). ``disable()`` removes exactly the hooks it added.
* Per-model choices, all visible in ``PEER_DEFAULTS`` and the benchmark's JSON:
  * TaylorSeer: diffusers' default module patterns (``^transformer_blocks.*attn`` with ``re.fullmatch``) match no
    module of ``DiTTransformer2DModel`` (its attention is ``attn1``), so the peer would silently never cache. The
    adapter passes ``cache_identifiers=[r"transformer_blocks\\.\\d+\\.(attn1|ff)"]`` (every attention and MLP, as
    in the paper) and ``taylor_factors_dtype=float32`` (default bf16).
  * FasterCache: its unconditional-branch skip assumes the batch is ``[uncond; cond]`` and splits only the kwargs
    it is told about, so it runs with ``cfg_mode="batch_uncond_first"`` and ``class_labels`` added to those
    kwargs; ``tensor_format="BCHW"`` (image model); ``attention_weight_callback`` returns 0.5 (diffusers' docs
    example; there is no default).
  * MagCache: diffusers takes one ratio list; we pass the cond ratios from our ``calibrate_magcache`` on the same
    calibration runs our MagCache gets.
* **cache-dit DBCache** (``cache_dit.enable_cache(BlockAdapter(...), cache_config=DBCacheConfig(...))``) with the
  ``DiTPatchFunctor`` and ``ForwardPattern.Pattern_3`` that cache-dit's own ``DiT`` adapter uses,
  ``enable_separate_cfg=False`` (one batched CFG call), and ``cache_dit.refresh_context(transformer,
  num_inference_steps=n)`` at the start of each trajectory (its transformer-only mode needs the step count).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: Peer name -> (library, default config). Keys of the config are the library's own config fields.
PEER_DEFAULTS: dict[str, dict[str, Any]] = {
    "diffusers_first_block_cache": {"threshold": 0.05},
    "diffusers_magcache": {"threshold": 0.06},
    "diffusers_taylorseer": {"cache_interval": 5},
    "diffusers_pab": {"spatial_attention_block_skip_range": 2},
    "diffusers_fastercache": {"spatial_attention_block_skip_range": 2},
    "cachedit_dbcache": {"residual_diff_threshold": 0.08, "Fn_compute_blocks": 1, "Bn_compute_blocks": 0},
}
PEERS = tuple(PEER_DEFAULTS)


def peers() -> list[str]:
    """Names of the peer caches the benchmark can run."""
    return list(PEERS)


def _diffusers_hook_names(module: torch.nn.Module) -> dict[int, set[str]]:
    out = {}
    for m in module.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None:
            out[id(m)] = set(reg.hooks)
    return out


@dataclass
class PeerHandle:
    """An enabled peer cache; ``disable()`` removes it. ``cfg_mode`` is the batch layout the peer needs."""

    name: str
    config: dict[str, Any]
    transformer: torch.nn.Module
    num_inference_steps: int
    cfg_mode: str = "batch"
    calls: int = 0
    timestep: float | None = None
    _handles: list[Any] = field(default_factory=list)
    _before: dict[int, set[str]] = field(default_factory=dict)
    _reset: Callable[[], None] | None = None
    _disable: Callable[[], None] | None = None

    @property
    def step_index(self) -> int:
        return self.calls

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(torch.as_tensor(t).flatten()[0]) if t is not None else None
        new_call = self.calls >= self.num_inference_steps or (
            t is not None and self.timestep is not None and t > self.timestep
        )
        if new_call or self.calls == 0:
            self.calls = 0
            if self._reset is not None:
                self._reset()
        self.timestep = t
        if self.name.startswith("diffusers_"):
            from diffusers.hooks.hooks import CacheContext, _set_cache_context

            ctx = CacheContext(
                "cond", step_index=self.calls, num_inference_steps=self.num_inference_steps, timestep=t
            )
            _set_cache_context(module, ctx)
        self.calls += 1

    def begin_call(self) -> None:
        """Mark a new trajectory (optional: a rising timestep or a full step count also starts one)."""
        self.calls, self.timestep = 0, None

    def disable(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._disable is not None:
            self._disable()
            self._disable = None


def enable_peer(
    transformer: torch.nn.Module, name: str, *, num_inference_steps: int, mag_ratios: Any = None, **config: Any
) -> PeerHandle:
    """Enable peer ``name`` (see :data:`PEERS`) on a DiT-style transformer with ``config`` (the library's fields,
    over :data:`PEER_DEFAULTS`). ``mag_ratios`` is required for ``diffusers_magcache``."""
    if name not in PEER_DEFAULTS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    cfg = {**PEER_DEFAULTS[name], **config}
    handle = PeerHandle(name=name, config=cfg, transformer=transformer, num_inference_steps=num_inference_steps)
    if name == "cachedit_dbcache":
        _enable_cachedit(handle, cfg)
    else:
        _enable_diffusers(handle, name, cfg, mag_ratios)
    handle._handles.append(transformer.register_forward_pre_hook(handle._pre_forward, with_kwargs=True))
    return handle


def _enable_diffusers(handle: PeerHandle, name: str, cfg: dict[str, Any], mag_ratios: Any) -> None:
    import diffusers
    from diffusers import hooks as dh
    from diffusers.hooks import HookRegistry

    tr = handle.transformer
    before = _diffusers_hook_names(tr)
    timestep = lambda: handle.timestep  # noqa: E731
    if name == "diffusers_first_block_cache":
        dh.apply_first_block_cache(tr, diffusers.FirstBlockCacheConfig(**cfg))
    elif name == "diffusers_magcache":
        if mag_ratios is None:
            raise ValueError("diffusers_magcache needs mag_ratios (e.g. calibrate_magcache(...)['cond'])")
        if isinstance(mag_ratios, dict):
            mag_ratios = mag_ratios.get("cond", next(iter(mag_ratios.values())))
        dh.apply_mag_cache(
            tr,
            diffusers.MagCacheConfig(
                num_inference_steps=handle.num_inference_steps, mag_ratios=torch.tensor(mag_ratios), **cfg
            ),
        )
    elif name == "diffusers_taylorseer":
        cfg = {
            "cache_identifiers": [r"transformer_blocks\.\d+\.(attn1|ff)"],
            "taylor_factors_dtype": torch.float32,
            **cfg,
        }
        dh.apply_taylorseer_cache(tr, diffusers.TaylorSeerCacheConfig(**cfg))
    elif name == "diffusers_pab":
        dh.apply_pyramid_attention_broadcast(
            tr, diffusers.PyramidAttentionBroadcastConfig(current_timestep_callback=timestep, **cfg)
        )
    elif name == "diffusers_fastercache":
        cfg = {
            "tensor_format": "BCHW",
            "attention_weight_callback": lambda _: 0.5,
            "_unconditional_conditional_input_kwargs_identifiers": ["hidden_states", "timestep", "class_labels"],
            **cfg,
        }
        dh.apply_faster_cache(tr, diffusers.FasterCacheConfig(current_timestep_callback=timestep, **cfg))
        handle.cfg_mode = "batch_uncond_first"
    handle.config = {k: v for k, v in cfg.items() if not callable(v)}
    added = {
        id(m): set(m._diffusers_hook.hooks) - before.get(id(m), set())
        for m in tr.modules()
        if getattr(m, "_diffusers_hook", None) is not None
    }
    if not any(added.values()):
        raise RuntimeError(f"{name}: diffusers registered no hook on {type(tr).__name__} (no matching module)")
    root = HookRegistry.check_if_exists_or_initialize(tr)
    invalidate = getattr(root, "invalidate_child_registries_cache", lambda: None)  # absent before diffusers 0.42
    invalidate()

    def reset() -> None:
        root.reset_stateful_hooks(recurse=True)

    def disable() -> None:
        for m in tr.modules():
            reg = getattr(m, "_diffusers_hook", None)
            for hook_name in added.get(id(m), ()):
                if reg is not None and hook_name in reg.hooks:
                    reg.remove_hook(hook_name, recurse=False)
        invalidate()

    handle._reset, handle._disable = reset, disable


def _enable_cachedit(handle: PeerHandle, cfg: dict[str, Any]) -> None:
    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
        from cache_dit.caching.patch_functors import DiTPatchFunctor
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("cachedit_dbcache needs cache-dit (pip install cache-dit==1.5.3)") from err
    tr = handle.transformer
    if type(tr).__name__ != "DiTTransformer2DModel":
        raise NotImplementedError(
            f"the cache-dit adapter here is wired for DiTTransformer2DModel, not {type(tr).__name__}"
        )
    config = {"max_warmup_steps": 4, "enable_separate_cfg": False, **cfg}
    cache_dit.enable_cache(
        BlockAdapter(
            transformer=tr,
            blocks=tr.transformer_blocks,
            forward_pattern=ForwardPattern.Pattern_3,
            patch_functor=DiTPatchFunctor(),
        ),
        cache_config=DBCacheConfig(num_inference_steps=handle.num_inference_steps, **config),
    )
    handle.config = config

    def reset() -> None:
        cache_dit.refresh_context(tr, num_inference_steps=handle.num_inference_steps)

    def disable() -> None:
        cache_dit.disable_cache(tr)

    handle._reset, handle._disable = reset, disable
