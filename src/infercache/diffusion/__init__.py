"""Step-level feature caching for diffusion transformers.

    from infercache.diffusion import enable_cache, disable_cache, policies
    enable_cache(pipe_or_transformer, "easycache", threshold=0.1)
    ...  # sample as usual
    print(cache_stats(pipe_or_transformer)[-1].summary())
    disable_cache(pipe_or_transformer)

Policies: ``easycache``, ``teacache``, ``magcache``, ``first_block_cache``, ``taylorseer`` (see ``policies()``).
Reference model: ``load_dit_digits()`` + ``sample(...)``. Docs: ``docs/diffusion.md``.
"""

from .calibration import (
    CalibrationTrace,
    calibrate_magcache,
    calibrate_teacache,
    fit_teacache_polynomial,
    record_calibration,
)
from .config import CacheConfig
from .hooks import begin_call, cache_stats, disable_cache, enable_cache, get_session
from .models import load_dit_digits, sample
from .policies import (
    CachePolicy,
    EasyCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from .registry import get_policy, policies, register_policy
from .session import CacheSession
from .stats import CallStats

__all__ = [
    "CacheConfig",
    "CachePolicy",
    "CacheSession",
    "CalibrationTrace",
    "CallStats",
    "EasyCacheConfig",
    "FirstBlockCacheConfig",
    "MagCacheConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "begin_call",
    "cache_stats",
    "calibrate_magcache",
    "calibrate_teacache",
    "disable_cache",
    "enable_cache",
    "fit_teacache_polynomial",
    "get_policy",
    "get_session",
    "load_dit_digits",
    "policies",
    "record_calibration",
    "register_policy",
    "sample",
]
