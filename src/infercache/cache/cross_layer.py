"""Cross-layer KV sharing: the inference side of Stochastic KV Routing (arXiv 2604.22782).

A sharing pattern says, for every layer, whose K/V it attends with: ``donors[l] == l`` (its own) or
``donors[l] == l - k`` for some ``k >= 1`` (a preceding layer). :class:`CrossLayerCache` gives sharing
layers a :class:`SharedLayer` that holds no tensors: its ``update`` returns the K/V its donor returned in
the same forward (the donor runs first), and its sequence length and mask sizes are the donor's.

What this does *not* save: the sharing layer's own ``k_proj``/``v_proj`` (and RoPE on its keys) are still
computed by the model and then discarded, because the attention module computes them before it calls the
cache. Skipping them would need changes to the model code (the paper's implementation does skip them).
Only cache memory is saved, not FLOPs.

Applied to a model that was not trained for it, sharing degrades quality (measured in
``docs/recompute-and-share.md``); :mod:`infercache.training.cross_layer` has the paper's training-side
random routing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from .kv_direct import tensor_nbytes

PATTERNS = ("none", "every_other", "all")


class PatternError(ValueError):
    """An invalid sharing pattern (a layer sharing from itself with k <= 0, from a later layer, across layer types...)."""


def _layer_types(config) -> tuple[list[str], list[dict]]:
    return get_layer_types_and_kwargs(config.get_text_config(decoder=True))


def resolve_pattern(pattern, layer_types: Sequence[str], *, k: int = 1) -> list[int]:
    """Donor per layer (``donors[l] == l``: own K/V) from any accepted pattern form, validated.

    Accepted forms:

    * ``"none"``: every layer keeps its own K/V;
    * ``"every_other"``: within each layer type, every second layer (the 2nd, 4th, ...) shares the layer of
      the same type ``k`` places before it in that type's order (``k=1``: the previous one). 50% of the
      layers of each type (rounded down) hold K/V;
    * ``"all"``: every layer shares the first layer of its type (one K/V per type);
    * a mapping ``{layer: offset}``: layer ``l`` uses layer ``l - offset`` (``offset >= 1``);
    * a sequence of donors, one per layer.

    A donor that itself shares is followed to the layer that holds K/V. Errors (:class:`PatternError`):
    ``offset <= 0``, a donor after the layer, a negative donor, a donor of another layer type (sliding vs
    full attention: different masks and RoPE), a wrong length.
    """
    n = len(layer_types)
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise PatternError(f"k must be an int >= 1 (a layer can only share from a preceding layer), got {k!r}")
    if isinstance(pattern, str):
        if pattern not in PATTERNS:
            raise PatternError(f"unknown pattern {pattern!r}; use one of {PATTERNS}, a {{layer: offset}} mapping or donors")
        donors = list(range(n))
        if pattern != "none":
            for kind in dict.fromkeys(layer_types):
                members = [i for i, t in enumerate(layer_types) if t == kind]
                for rank, layer in enumerate(members):
                    if pattern == "all" and rank > 0:
                        donors[layer] = members[0]
                    elif pattern == "every_other" and rank % 2 == 1 and rank - k >= 0:
                        donors[layer] = members[rank - k]
    elif isinstance(pattern, Mapping):
        donors = list(range(n))
        for layer, offset in pattern.items():
            if not isinstance(layer, int) or not 0 <= layer < n:
                raise PatternError(f"layer {layer!r} is not a layer index in [0, {n})")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset <= 0:
                raise PatternError(f"layer {layer}: offset k must be an int >= 1 (share from layer l - k), got {offset!r}")
            donors[layer] = layer - offset
    elif isinstance(pattern, Sequence):
        donors = list(pattern)
        if len(donors) != n:
            raise PatternError(f"{len(donors)} donors given for {n} layers")
    else:
        raise PatternError(f"pattern must be a name, a {{layer: offset}} mapping or a donor list, got {type(pattern).__name__}")
    for layer, donor in enumerate(donors):
        if isinstance(donor, bool) or not isinstance(donor, int):
            raise PatternError(f"layer {layer}: donor must be a layer index, got {donor!r}")
        if donor > layer:
            raise PatternError(f"layer {layer} cannot share from later layer {donor} (its K/V do not exist yet)")
        if donor < 0:
            raise PatternError(f"layer {layer}: donor {donor} is before the first layer")
        if layer_types[donor] != layer_types[layer]:
            raise PatternError(
                f"layer {layer} ({layer_types[layer]}) cannot share from layer {donor} ({layer_types[donor]}): "
                "different mask and RoPE"
            )
    for layer in range(n):  # follow chains to the layer that holds K/V (donors precede, so one pass suffices)
        donors[layer] = donors[donors[layer]]
    return donors


def sharing_fraction(donors: Sequence[int]) -> float:
    """Fraction of layers that hold no K/V."""
    return sum(d != i for i, d in enumerate(donors)) / len(donors)


class SharedLayer(CacheLayerMixin):
    """A sharing layer: holds no tensors; returns the K/V its donor returned in the same forward."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: "CrossLayerCache", layer_idx: int, donor: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.donor = donor

    @property
    def donor_layer(self):
        return self.cache.layers[self.donor]

    @property
    def is_sliding(self):
        return getattr(self.donor_layer, "is_sliding", False)

    @property
    def is_initialized(self):
        return self.donor_layer.is_initialized

    @is_initialized.setter
    def is_initialized(self, value):  # CacheLayerMixin.__init__ assigns it; the donor decides
        pass

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        shared = self.cache._returned.get(self.donor)
        if shared is None:
            raise RuntimeError(f"cross_layer: layer {self.layer_idx} ran before its donor layer {self.donor}")
        keys, values = shared
        if (keys.shape[0], keys.shape[1], keys.shape[-1]) != (key_states.shape[0], key_states.shape[1], key_states.shape[-1]):
            raise RuntimeError(
                f"cross_layer: layer {self.layer_idx} K/V {tuple(key_states.shape)} do not match donor {self.donor}'s "
                f"{tuple(keys.shape)} (batch, KV heads and head_dim must agree)"
            )
        self.cache._consumed(self.layer_idx, self.donor)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.donor_layer.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.donor_layer.get_seq_length()

    def get_max_length(self) -> int:
        return self.donor_layer.get_max_length()

    def reset(self) -> None:
        pass

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("cross_layer: beam search, num_return_sequences > 1 and cropping are not supported")

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = offload = prefetch = _unsupported

    def nbytes(self) -> int:
        return 0


class CrossLayerCache(Cache):
    """A transformers ``Cache`` in which sharing layers store nothing and attend with a donor layer's K/V.

    Donor layers are transformers' own ``DynamicLayer`` (full attention) or ``DynamicSlidingWindowLayer``.
    Build with :func:`build_cross_layer_cache`.
    """

    def __init__(self, config, pattern="every_other", *, k: int = 1):
        layer_types, kwargs = _layer_types(config)
        donors = resolve_pattern(pattern, layer_types, k=k)
        layers = []
        for idx, (kind, kw) in enumerate(zip(layer_types, kwargs)):
            if donors[idx] != idx:
                layers.append(SharedLayer(self, idx, donors[idx]))
            elif kind == "full_attention":
                layers.append(DynamicLayer())
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kw))
            else:
                raise NotImplementedError(f"cross_layer: layer type {kind!r} (layer {idx}) is not supported")
        super().__init__(layers=layers)
        self.donors = donors
        self.layer_types = layer_types
        self._last_user = {d: max(i for i, x in enumerate(donors) if x == d) for d in set(donors) if donors.count(d) > 1}
        self._returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in self._last_user:  # a donor: keep what it returned until its last sharer used it
            self._returned[layer_idx] = (keys, values)
        return keys, values

    def _consumed(self, layer_idx: int, donor: int) -> None:
        if self._last_user.get(donor) == layer_idx:
            del self._returned[donor]  # no reference outlives the forward

    # ------------------------------------------------------------------ reports
    def layer_nbytes(self) -> list[int]:
        """Bytes each layer holds (walking its own tensors; sharing layers hold none)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, SharedLayer) or not layer.is_initialized:
                out.append(0)
            else:
                out.append(tensor_nbytes([layer.keys, layer.values]))
        return out

    def nbytes(self) -> int:
        """All K/V bytes held (each storage counted once)."""
        return tensor_nbytes(
            t for layer in self.layers if not isinstance(layer, SharedLayer) and layer.is_initialized
            for t in (layer.keys, layer.values)
        )

    def lengths(self) -> list[torch.Tensor | None]:
        """K/V entries held per layer as ``[B, Hkv]`` (zeros for sharing layers: they hold nothing)."""
        out = []
        for layer in self.layers:
            source = layer.donor_layer if isinstance(layer, SharedLayer) else layer
            if source.is_initialized and source.keys is not None:
                b, h, n = source.keys.shape[:3]
                out.append(torch.full((b, h), 0 if isinstance(layer, SharedLayer) else n, dtype=torch.long))
            else:
                out.append(None)
        return out

    def sharing_fraction(self) -> float:
        return sharing_fraction(self.donors)

    def report(self) -> dict:
        return {
            "method": "cross_layer",
            "donors": list(self.donors),
            "sharing_fraction": self.sharing_fraction(),
            "seen_tokens": self.get_seq_length(),
            "nbytes": self.nbytes(),
            "layer_nbytes": self.layer_nbytes(),
        }


def build_cross_layer_cache(model, pattern="every_other", *, k: int = 1) -> CrossLayerCache:
    """A cross-layer sharing cache for ``model`` (see :func:`resolve_pattern` for ``pattern`` and ``k``).

    Works with any attention implementation; the model is not modified.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError("cross_layer: decoder-only causal LMs only")
    return CrossLayerCache(model.config, pattern, k=k)


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sharing_quality(model, input_ids: torch.Tensor, pattern="every_other", *, k: int = 1) -> dict:
    """Teacher-forced quality of a sharing pattern against the full cache on ``input_ids [1, T]``.

    Returns perplexity (full and shared), KL(full || shared) per position (nats), top-1 agreement and the
    cache bytes of both.
    """
    from ..bench.metrics import kl_divergence, top1_agreement

    full_cache = CrossLayerCache(model.config, "none")
    full = model(input_ids, cache=full_cache, use_cache=True).logits[:, :-1]
    shared_cache = build_cross_layer_cache(model, pattern, k=k)
    shared = model(input_ids, cache=shared_cache, use_cache=True).logits[:, :-1]
    targets = input_ids[:, 1:]

    def ppl(logits):
        return float(torch.exp(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())))

    return {
        "pattern": pattern if isinstance(pattern, str) else "custom",
        "k": k,
        "sharing_fraction": shared_cache.sharing_fraction(),
        "tokens": int(input_ids.shape[1]),
        "ppl_full": ppl(full),
        "ppl_shared": ppl(shared),
        "kl": kl_divergence(full, shared),
        "top1_agreement": top1_agreement(full, shared),
        "nbytes_full": full_cache.nbytes(),
        "nbytes_shared": shared_cache.nbytes(),
    }
