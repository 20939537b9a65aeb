import pytest

from infercache.diffusion import EasyCacheConfig, enable_cache, get_policy, policies
from infercache.diffusion.config import CacheConfig

BUILTIN = {"easycache", "teacache", "magcache", "first_block_cache", "taylorseer", "profiling_dit", "ertacache"}


def test_policies_lists_builtins():
    assert BUILTIN <= set(policies())


def test_unknown_policy_error_lists_names(model):
    transformer, _ = model
    with pytest.raises(ValueError) as err:
        enable_cache(transformer, "nocache-at-all")
    msg = str(err.value)
    assert "nocache-at-all" in msg and all(name in msg for name in BUILTIN)
    with pytest.raises(ValueError, match="known policies"):
        get_policy("nope")


def test_unknown_option_error_lists_valid_options(model):
    transformer, _ = model
    with pytest.raises(TypeError, match="thresh.*valid options.*threshold"):
        enable_cache(transformer, "easycache", thresh=0.1)


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        EasyCacheConfig(threshold=-1)
    with pytest.raises(ValueError, match="warmup_ratio"):
        CacheConfig(warmup_ratio=2.0)


def test_config_object_and_double_enable(model):
    transformer, _ = model
    session = enable_cache(transformer, EasyCacheConfig(threshold=0.1))
    assert session.policy.name == "easycache" and session.policy.config.threshold == 0.1
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_cache(transformer, "teacache")


def test_magcache_requires_ratios(model):
    transformer, _ = model
    with pytest.raises(ValueError, match="calibrate_magcache"):
        enable_cache(transformer, "magcache")


def test_new_policies_require_their_inputs(model):
    transformer, _ = model
    with pytest.raises(ValueError, match="background_blocks"):
        enable_cache(transformer, "profiling_dit")
    with pytest.raises(ValueError, match="exactly one"):
        enable_cache(transformer, "profiling_dit", background_blocks=[1], foreground_blocks=[0])
    with pytest.raises(ValueError, match="out of range"):
        enable_cache(transformer, "profiling_dit", background_blocks=[7])
    with pytest.raises(ValueError, match="calibrate_ertacache"):
        enable_cache(transformer, "ertacache")
