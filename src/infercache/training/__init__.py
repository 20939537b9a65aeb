"""Training-side helpers (fine-tuning wrappers that make a model robust to an inference-time cache scheme)."""

from .cross_layer import RoutingCache, StochasticKVRouting

__all__ = ["RoutingCache", "StochasticKVRouting"]
