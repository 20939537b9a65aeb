"""Stochastic KV Routing (arXiv 2604.22782, "random cross-layer attention"), training side.

In every training forward each layer attends, at random, either with its own K/V or with the K/V of a
preceding layer. A model fine-tuned this way tolerates the deterministic sharing patterns of
:class:`infercache.cache.cross_layer.CrossLayerCache` at inference.

Implementation: no model code is changed. Each forward gets a fresh :class:`RoutingCache` (a transformers
``Cache``) whose ``update`` for layer ``l`` stores ``l``'s own K/V and returns those of the layer the route
picked; gradients flow to the donor's projections (the routed layer's own ``k_proj``/``v_proj`` get no
gradient from that forward).

Our choices where the paper is silent (its code is not public):

* ``p`` (probability that a layer routes to a preceding layer) is not given in the paper; default 0.5;
* the donor is drawn uniformly from the ``max_distance`` preceding layers *of the same type* (default 1:
  the previous one; ``None``: any preceding one); sliding and full-attention layers never mix;
* the routing decision is per forward and per layer, shared by all sequences of the batch;
* a layer routed to ``l-1`` gets ``l-1``'s *own* K/V, even when ``l-1`` itself was routed further back.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs


class RoutingCache(Cache):
    """A one-forward cache: layer ``l`` stores its own K/V and attends with those of ``route[l]`` (``<= l``)."""

    def __init__(self, config, route: list[int]):
        layer_types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        if len(route) != len(layer_types):
            raise ValueError(f"route has {len(route)} entries for {len(layer_types)} layers")
        for layer, donor in enumerate(route):
            if not 0 <= donor <= layer:
                raise ValueError(f"layer {layer} cannot route to layer {donor} (must be a preceding layer or itself)")
            if layer_types[donor] != layer_types[layer]:
                raise ValueError(f"layer {layer} ({layer_types[layer]}) cannot route to layer {donor} ({layer_types[donor]})")
        layers = []
        for kind, kw in zip(layer_types, kwargs):
            if kind == "full_attention":
                layers.append(DynamicLayer())
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kw))
            else:
                raise NotImplementedError(f"routing: layer type {kind!r} is not supported")
        super().__init__(layers=layers)
        self.route = list(route)
        self._own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        own = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._own[layer_idx] = own
        donor = self.route[layer_idx]
        if donor == layer_idx:
            return own
        if donor not in self._own:
            raise RuntimeError(f"routing: layer {layer_idx} ran before its donor {donor}; the cache serves one forward")
        return self._own[donor]


class StochasticKVRouting(torch.nn.Module):
    """Wrap a causal LM for random cross-layer attention during training.

    >>> routed = StochasticKVRouting(model, p=0.5, seed=0)
    >>> routed.train(); loss = routed(input_ids=ids, labels=ids).loss   # a fresh random route per forward

    In training mode every forward samples a route (deterministic given ``seed`` and the number of forwards
    so far) and runs the model with a :class:`RoutingCache`; ``last_route`` holds it. In eval mode the
    model runs unchanged (give it a :class:`~infercache.cache.cross_layer.CrossLayerCache` to share).
    """

    def __init__(self, model, p: float = 0.5, *, max_distance: int | None = 1, seed: int = 0):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if max_distance is not None and (isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 1):
            raise ValueError(f"max_distance must be an int >= 1 or None, got {max_distance!r}")
        self.model = model
        self.p = p
        self.max_distance = max_distance
        self.seed = seed
        self.layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
        self.generator = torch.Generator().manual_seed(seed)
        self.last_route: list[int] | None = None

    def candidates(self, layer: int) -> list[int]:
        """Preceding layers of the same type that ``layer`` may route to (nearest last)."""
        same = [j for j in range(layer) if self.layer_types[j] == self.layer_types[layer]]
        return same if self.max_distance is None else same[-self.max_distance :]

    def sample_route(self) -> list[int]:
        """One route: ``route[l]`` is ``l`` (own K/V) or a preceding same-type layer (probability ``p``)."""
        route = []
        for layer in range(len(self.layer_types)):
            draw = torch.rand(2, generator=self.generator)  # always two draws per layer: reproducible streams
            options = self.candidates(layer)
            if options and float(draw[0]) < self.p:
                route.append(options[min(int(float(draw[1]) * len(options)), len(options) - 1)])
            else:
                route.append(layer)
        return route

    def reseed(self, seed: int | None = None) -> None:
        self.generator.manual_seed(self.seed if seed is None else seed)

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.model(*args, **kwargs)
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("routing: the wrapper supplies its own per-forward cache in training mode")
        self.last_route = self.sample_route()
        kwargs["cache"] = RoutingCache(self.model.config, self.last_route)
        kwargs["use_cache"] = True
        return self.model(*args, **kwargs)
