"""Step-level feature caching for diffusion transformers.

    from infercache.diffusion import enable_cache, disable_cache, policies
    enable_cache(pipe_or_transformer, "easycache", threshold=0.1)
    ...  # sample as usual
    print(cache_stats(pipe_or_transformer)[-1].summary())
    disable_cache(pipe_or_transformer)

Policies: ``easycache``, ``teacache``, ``magcache``, ``first_block_cache``, ``taylorseer``, ``profiling_dit``,
``ertacache`` (see ``policies()``).
Reference model: ``load_dit_digits()`` + ``sample(...)``. Autoregressive video KV cache (sink / compressed mid /
recent, shared across denoising steps): ``infercache.diffusion.video``. Docs: ``docs/diffusion.md``.
"""

from .calibration import (
    CalibrationTrace,
    calibrate_magcache,
    calibrate_teacache,
    fit_teacache_polynomial,
    record_calibration,
)
from .calibration_erta import calibrate_ertacache
from .config import CacheConfig
from .hooks import begin_call, cache_stats, disable_cache, enable_cache, get_session
from .models import load_dit_digits, sample
from .policies import (
    CachePolicy,
    EasyCacheConfig,
    ErtaCacheConfig,
    ErtaSchedule,
    FirstBlockCacheConfig,
    MagCacheConfig,
    ProfilingDiTConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from .profiling import BlockProfile, profile_blocks
from .registry import get_policy, policies, register_policy
from .session import CacheSession
from .stats import CallStats

__all__ = [
    "BlockProfile",
    "CacheConfig",
    "CachePolicy",
    "CacheSession",
    "CalibrationTrace",
    "CallStats",
    "EasyCacheConfig",
    "ErtaCacheConfig",
    "ErtaSchedule",
    "FirstBlockCacheConfig",
    "MagCacheConfig",
    "ProfilingDiTConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "begin_call",
    "cache_stats",
    "calibrate_ertacache",
    "calibrate_magcache",
    "calibrate_teacache",
    "disable_cache",
    "enable_cache",
    "fit_teacache_polynomial",
    "get_policy",
    "get_session",
    "load_dit_digits",
    "policies",
    "profile_blocks",
    "record_calibration",
    "register_policy",
    "sample",
]
