"""``CompressedCache``: a transformers ``Cache`` whose full-attention layers hold only what a policy keeps.

Per layer and per KV head the kept lengths may all differ; storage is ragged and paged (see
:mod:`infercache.cache.ragged`), so the bytes held are the kept entries plus under one page of slack per
head. Two counters per layer: tokens *seen* (what transformers' ``get_seq_length`` reports, so
``generate`` continues positions correctly) and entries *kept*. Keys are stored after RoPE at their
original positions. Sliding-window layers (Gemma-3, ...) keep transformers' own bounded
``DynamicSlidingWindowLayer`` and are never compressed.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from .attention import mark_update
from .engine import CompressionEngine


def full_attention_layers(config) -> list[int]:
    """Indices of the full-attention layers of a model config: the layers a compressed cache owns."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return [i for i, t in enumerate(layer_types) if t == "full_attention"]


class SeenTokensLayer(CacheLayerMixin):
    """A layer that reports the tokens it has *seen* (not the entries it holds) to transformers, so masks and
    ``cache_position`` continue from the true position after eviction, checkpointing or sharing."""

    seen: int = 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1


class CompressedLayer(SeenTokensLayer):
    """One full-attention layer: ragged per-(row, KV head) storage driven by the engine."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, engine: CompressionEngine, layer_idx: int):
        super().__init__()
        self.engine = engine
        self.layer_idx = layer_idx
        self.store = None
        self.seen = 0
        self.pending = None
        self.last_old = None
        self.last_bias = None
        self.capacity = None
        self.query_buffer = None
        self.steps_since = 0
        self.next_position = None
        self.prefill_lengths = None
        self.prefill_kept = None
        self.attn_input = None
        self.last_call = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError(
                "infercache: the previous forward never reached the 'infercache' attention function; the model's "
                "attention implementation was changed after the cache was made. Build the cache with "
                "infercache.compressed_cache(model, ...), which sets it."
            )
        q = key_states.shape[-2]
        self.seen += q
        if self.store is None:
            self.pending = (key_states, value_states)
            mark_update(self, key_states)
            return key_states, value_states
        # per-entry statistics of the new tokens (e.g. retention gates' log beta) go in with their K/V
        self.store.append({"k": key_states, "v": value_states, **self.engine.new_entry_stats(self, q)})
        names = ("k", "v", "bias") if "bias" in self.store.pools else ("k", "v")
        chans, _ = self.store.gather(names)
        self.last_old = self.store.lengths - q
        self.last_bias = chans.get("bias")
        mark_update(self, chans["k"])
        return chans["k"], chans["v"]

    @property
    def batch_size(self) -> int:
        return self.store.batch if self.store is not None else -1

    def reset(self) -> None:
        self.__init__(self.engine, self.layer_idx)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "infercache's compressed cache does not support beam search, num_return_sequences > 1 or cache cropping "
            "(assisted decoding); use greedy or sampling with one sequence per prompt"
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = _unsupported

    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes(("k", "v"))

    def lengths(self) -> torch.Tensor:
        if self.store is None:
            return torch.zeros(0, 0, dtype=torch.long)
        return self.store.lengths.clone()


class CompressedCache(Cache):
    """A transformers ``Cache`` for ``past_key_values`` that compresses full-attention layers with a policy.

    Build it with :func:`infercache.compressed_cache`; one cache serves one ``generate`` call or one
    sequence of forwards (prefill, then any number of later forwards).
    """

    def __init__(self, config, engine: CompressionEngine):
        text_config = config.get_text_config(decoder=True)
        layer_types, kwargs = get_layer_types_and_kwargs(text_config)
        layers = []
        for idx, (kind, kw) in enumerate(zip(layer_types, kwargs)):
            if kind == "full_attention":
                layers.append(CompressedLayer(engine, idx))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kw))
            else:
                raise NotImplementedError(f"infercache: layer type {kind!r} (layer {idx}) is not supported")
        super().__init__(layers=layers)
        self.engine = engine
        self.policy = engine.policy
        self.budget = engine.budget
        engine.layers = self.layers

    def capture_attention_input(self, layer_idx: int, hidden, position_ids=None) -> None:
        """Called by the capture hook (:mod:`.capture`) for policies that read the attention input."""
        layer = self.layers[layer_idx]
        if self.policy.needs_attention_input and isinstance(layer, CompressedLayer):
            layer.attn_input = hidden

    # ------------------------------------------------------------------ reports
    def nbytes(self) -> int:
        """Bytes of key/value tensors actually held, all layers (walks the tensors, sliding layers included)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                total += layer.nbytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        return total

    def lengths(self) -> list[torch.Tensor | None]:
        """Kept entries per layer as ``[B, Hkv]`` tensors (sliding layers: their window length for every head)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                out.append(layer.lengths())
            elif layer.is_initialized and layer.keys is not None:
                b, h, n = layer.keys.shape[:3]
                out.append(torch.full((b, h), n, dtype=torch.long))
            else:
                out.append(None)
        return out

    def seen_tokens(self) -> int:
        return self.get_seq_length()

    def report(self) -> dict:
        """A JSON-friendly summary: method, budget, bytes, per-layer per-head lengths."""
        return {
            "method": self.policy.name,
            "budget": str(self.budget),
            "seen_tokens": self.get_seq_length(),
            "nbytes": self.nbytes(),
            "lengths": [None if t is None else t.tolist() for t in self.lengths()],
            "compressed_layers": self.engine.compressed_layers,
        }
