"""KV-cache compression policies, one file per method. ``get_policy(name, **options)`` builds one."""

from __future__ import annotations

from .adakv import AdaKV
from .base import Policy, ScoreContext
from .dapq import DapQ
from .elastic import ElasticCache
from .expected_attention import ExpectedAttention
from .full import Full
from .h2o import H2O
from .knorm import KNorm
from .pyramidkv import PyramidKV
from .random import Random
from .razor import RazorAttention
from .retention_gates import RetentionGates
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA
from .windowkv import WindowKV

POLICIES: dict[str, type[Policy]] = {
    "full": Full,
    "random": Random,
    "streaming_llm": StreamingLLM,
    "h2o": H2O,
    "tova": TOVA,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "knorm": KNorm,
    "expected_attention": ExpectedAttention,
    "razor": RazorAttention,
    "windowkv": WindowKV,
    "dapq": DapQ,
    "elastic": ElasticCache,
    "retention_gates": RetentionGates,
}


class UnknownMethodError(ValueError):
    """Raised for a method name that is not registered."""


def get_policy(name: str | Policy, **options) -> Policy:
    """Build a policy by name with its options (``adakv`` takes ``scorer=`` a name or a policy)."""
    if isinstance(name, Policy):
        if options:
            raise ValueError("options are given to the policy's constructor, not with a built policy")
        return name
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(POLICIES)}") from None
    if cls is AdaKV:  # AdaKV's own options stay; the others configure its scorer
        scorer = options.pop("scorer", "snapkv")
        own = {k: options.pop(k) for k in ("alpha",) if k in options}
        if isinstance(scorer, str):
            scorer = get_policy(scorer, **options)
        elif options:
            raise ValueError(f"options {sorted(options)} need a scorer given by name")
        return AdaKV(scorer=scorer, **own)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad option for method {name!r}: {err}") from None


__all__ = ["POLICIES", "Policy", "ScoreContext", "UnknownMethodError", "get_policy", *[c.__name__ for c in POLICIES.values()]]
