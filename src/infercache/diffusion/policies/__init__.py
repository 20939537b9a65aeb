"""Built-in diffusion caching policies (importing this package registers them)."""

from .base import BranchState, CachePolicy, ProbeInput, StepInfo
from .easycache import EasyCacheConfig, EasyCachePolicy
from .ertacache import ErtaCacheConfig, ErtaCachePolicy, ErtaSchedule
from .first_block_cache import FirstBlockCacheConfig, FirstBlockCachePolicy
from .magcache import MagCacheConfig, MagCachePolicy
from .profiling_dit import ProfilingDiTConfig, ProfilingDiTPolicy
from .taylorseer import TaylorSeerConfig, TaylorSeerPolicy
from .teacache import TeaCacheConfig, TeaCachePolicy

__all__ = [
    "BranchState",
    "CachePolicy",
    "ProbeInput",
    "StepInfo",
    "EasyCacheConfig",
    "EasyCachePolicy",
    "ErtaCacheConfig",
    "ErtaCachePolicy",
    "ErtaSchedule",
    "FirstBlockCacheConfig",
    "FirstBlockCachePolicy",
    "MagCacheConfig",
    "MagCachePolicy",
    "ProfilingDiTConfig",
    "ProfilingDiTPolicy",
    "TaylorSeerConfig",
    "TaylorSeerPolicy",
    "TeaCacheConfig",
    "TeaCachePolicy",
]
