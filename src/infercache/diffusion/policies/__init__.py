"""Built-in diffusion caching policies (importing this package registers them)."""

from .base import BranchState, CachePolicy, ProbeInput, StepInfo
from .easycache import EasyCacheConfig, EasyCachePolicy
from .first_block_cache import FirstBlockCacheConfig, FirstBlockCachePolicy
from .magcache import MagCacheConfig, MagCachePolicy
from .taylorseer import TaylorSeerConfig, TaylorSeerPolicy
from .teacache import TeaCacheConfig, TeaCachePolicy

__all__ = [
    "BranchState",
    "CachePolicy",
    "ProbeInput",
    "StepInfo",
    "EasyCacheConfig",
    "EasyCachePolicy",
    "FirstBlockCacheConfig",
    "FirstBlockCachePolicy",
    "MagCacheConfig",
    "MagCachePolicy",
    "TaylorSeerConfig",
    "TaylorSeerPolicy",
    "TeaCacheConfig",
    "TeaCachePolicy",
]
