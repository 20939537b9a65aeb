"""Stream policies by name: ``streaming_llm``, ``streaming_vlm``, ``rekv``."""

from __future__ import annotations

import dataclasses

from ..errors import StreamBudgetError, UnknownStreamPolicyError
from .base import StreamPolicy
from .rekv import ReKV
from .streaming_llm import StreamingLLM
from .streaming_vlm import StreamingVLM

POLICIES: dict[str, type[StreamPolicy]] = {
    "streaming_llm": StreamingLLM,
    "streaming_vlm": StreamingVLM,
    "rekv": ReKV,
}


def get_policy(policy: str | StreamPolicy, **options) -> StreamPolicy:
    """A policy instance from a name (options go to its constructor) or an instance (no options)."""
    if isinstance(policy, StreamPolicy):
        if options:
            raise StreamBudgetError(f"options {sorted(options)} given with a policy instance; set them on the instance")
        return policy
    if not isinstance(policy, str) or policy not in POLICIES:
        raise UnknownStreamPolicyError(f"unknown stream policy {policy!r}; available: {', '.join(POLICIES)}")
    cls = POLICIES[policy]
    allowed = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"stream policy {policy!r} does not take option(s) {unknown}; it takes {allowed}")
    return cls(**options)


__all__ = ["POLICIES", "ReKV", "StreamPolicy", "StreamingLLM", "StreamingVLM", "get_policy"]
