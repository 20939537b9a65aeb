"""``StreamCache``: a transformers ``Cache`` that holds pre-RoPE keys and re-positions them on every forward.

Each layer holds ``[1, H, N, D]`` keys **before RoPE** and values; the cache holds the entries' metadata
(:class:`~infercache.stream.entries.Entries`: stream index, current position, modality, chunk), the same for every
layer. A forward is opened by the stream with :meth:`StreamCache.begin` (the new entries and their positions) and
closed with :meth:`commit` (or :meth:`abort`). In ``update`` a layer

1. takes RoPE off the incoming keys (cos/sin of the positions they were rotated at, from the model's own
   ``rotary_emb``) and appends them;
2. returns the held keys rotated at their *current* positions followed by the incoming keys as the model made
   them (so a stream that never evicted is the plain model up to float rounding: tested).

Eviction (:meth:`keep`) drops entries from every layer and re-positions the rest contiguously
(:func:`~infercache.stream.positions.reposition`), so positions never exceed the number of held entries.

Sliding-window layers (Gemma-3's local layers) are *local* when the policy allows it
(:meth:`~infercache.stream.policies.base.StreamPolicy.local_window_ok`: evictions keep the sinks and drop only the
oldest of the rest, and the window is smaller than the budget): after every fed chunk they keep only the sinks and
the newest ``window - 1`` entries (:meth:`StreamCache.trim`). No later eviction can bring an older entry back into
their window, so their outputs are unchanged (tested), and they hold ``sinks + window - 1`` entries instead of
``budget``. ReKV neither offloads nor retrieves for a local layer (its window never reaches the retrieved blocks).

The attention itself is the ``"infercache_stream"`` function (:mod:`infercache.stream.attention`), which builds the
causal mask from the cache (and Gemma-3's sliding window), and lets ReKV insert retrieved blocks after the sinks.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..compress import UnsupportedModelError
from .attention import mark_update
from .entries import Entries
from .positions import reposition
from .rotary import Rotary, apply_rope


class Retrieval(Protocol):
    """What a retrieving policy (ReKV) plugs into the cache for the duration of a question."""

    insert_at: int  # retrieved entries go after this many held entries (the sinks)

    def fetch(self, layer: "StreamLayer", query_pre_rope: torch.Tensor):
        """``(keys rotated at their view positions [1, H, R, D], values, logit bias [R])`` or ``None``."""


class StreamLayer(CacheLayerMixin):
    """One attention layer of a :class:`StreamCache` (full or sliding: the sliding window is applied by the mask).

    ``window`` is set for a *local* layer: it holds the first ``head`` entries of the cache (its sinks) and the newest
    ones, at most ``window - 1`` of those between feeds.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: "StreamCache", layer_idx: int, layer_type: str):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.layer_type = layer_type
        self.keys: torch.Tensor | None = None  # pre-RoPE
        self.values: torch.Tensor | None = None
        self.retrieved = None  # ReKV: (keys, values, bias) fetched for the current question
        self.window: int | None = None  # local layer: keep only the sinks and the newest ``window - 1`` entries
        self.sinks = 0
        self.head = 0  # local layer holding fewer entries than the cache: how many of its first entries it holds

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError(f"a stream holds one sequence; got a batch of {key_states.shape[0]}")
        cos_old, sin_old, cos_new, sin_new = self.owner.rope(self.layer_type)
        if cos_new.shape[0] != key_states.shape[2]:
            raise RuntimeError(
                f"infercache.stream: layer {self.layer_idx} got {key_states.shape[2]} new keys but the stream opened "
                f"a forward of {cos_new.shape[0]}; drive the model through stream.feed/ask"
            )
        rows = self.rows(cos_old.shape[0])
        if rows is not None:
            cos_old, sin_old = cos_old[rows], sin_old[rows]
        old = apply_rope(self.keys, cos_old, sin_old)
        self.keys = torch.cat([self.keys, apply_rope(key_states, cos_new, sin_new, inverse=True)], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        keys = torch.cat([old, key_states], dim=2)
        mark_update(self, keys)
        return keys, self.values

    def attention_inputs(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Keys, values and an optional per-key logit bias for the attention (ReKV inserts retrieved blocks)."""
        retrieval = self.owner.retrieval
        if retrieval is None or self.window is not None:  # a local layer's window never reaches retrieved blocks
            return keys, values, None
        if self.retrieved is None:
            _, _, cos_new, sin_new = self.owner.rope(self.layer_type)
            self.retrieved = retrieval.fetch(self, apply_rope(query, cos_new, sin_new, inverse=True)) or ()
        if not self.retrieved:
            return keys, values, None
        k_r, v_r, bias_r = self.retrieved
        s = retrieval.insert_at
        keys = torch.cat([keys[:, :, :s], k_r.to(keys.dtype), keys[:, :, s:]], dim=2)
        values = torch.cat([values[:, :, :s], v_r.to(values.dtype), values[:, :, s:]], dim=2)
        bias = torch.zeros(keys.shape[2], dtype=torch.float32, device=keys.device)
        bias[s : s + k_r.shape[2]] = bias_r.to(bias.device)
        return keys, values, bias

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.retrieved = None
        self.is_initialized = False

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "a stream cache serves one sequence driven by infercache.stream (feed/ask); beam search, "
            "num_return_sequences > 1 and cropping are not supported"
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = _unsupported

    def rows(self, total: int) -> torch.Tensor | None:
        """Which of the cache's ``total`` entries this layer holds (``None``: all of them)."""
        held = self.get_seq_length()
        if held == total:
            return None
        return torch.cat([torch.arange(self.head), torch.arange(total - (held - self.head), total)])

    def select(self, idx: torch.Tensor, total: int | None = None) -> None:
        """Keep entries ``idx`` (sorted indices into the cache's ``total`` entries; a local layer maps them onto
        the entries it holds and forgets the others: they are outside its window)."""
        if self.keys is None:
            return
        held = self.keys.shape[2]
        if total is not None and held != total:
            tail_start = total - (held - self.head)
            first = idx[idx < self.head]
            idx = torch.cat([first, idx[idx >= tail_start] - tail_start + self.head])
            self.head = first.numel()
        idx = idx.to(self.keys.device)
        self.keys = self.keys[:, :, idx]
        self.values = self.values[:, :, idx]

    def trim(self, total: int) -> None:
        """A local layer keeps its sinks and its newest ``window - 1`` entries (copied: the memory is freed)."""
        if self.window is None or self.keys is None:
            return
        held = self.keys.shape[2]
        if held == total:
            self.head = min(self.sinks, total)
        extra = held - self.head - (self.window - 1)
        if extra > 0:
            keep = torch.cat([torch.arange(self.head), torch.arange(self.head + extra, held)]).to(self.keys.device)
            self.keys = self.keys[:, :, keep]
            self.values = self.values[:, :, keep]

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class StreamCache(Cache):
    """The cache behind :class:`infercache.stream.Stream`; see the module docstring."""

    def __init__(self, config, rotary: Rotary):
        text_config = config.get_text_config(decoder=True)
        n_layers = int(text_config.num_hidden_layers)
        layer_types = list(getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers)
        for idx, kind in enumerate(layer_types):
            if kind not in ("full_attention", "sliding_attention"):
                raise UnsupportedModelError(
                    f"infercache.stream: layer {idx} is {kind!r}; only full and sliding-window attention layers "
                    "can be streamed"
                )
        super().__init__(layers=[StreamLayer(self, i, t) for i, t in enumerate(layer_types)])
        window = getattr(text_config, "sliding_window", None)
        self.sliding_window = int(window) if window and "sliding_attention" in layer_types else None
        self.rotary = rotary
        self.entries = Entries.empty(rotary.dims)
        self.pending: Entries | None = None
        self.retrieval: Retrieval | None = None
        self._shift: tuple[int, int] = (0, 0)
        self._rope: dict[str, tuple] = {}
        self._old_rope: dict[str, tuple] = {}  # cos/sin of the held entries, valid until they move
        self._lengths: list[int] = []  # entries each layer held when the open forward began

    # ------------------------------------------------------------------ one forward
    def begin(self, new: Entries, *, shift_from: int = 0, shift: int = 0) -> torch.Tensor:
        """Open a forward of ``new`` entries; returns the ``position_ids`` to pass to the model.

        ``shift`` moves held entries from ``shift_from`` on, and the new ones, by that many positions for this
        forward only (ReKV makes room for retrieved blocks after the sinks).
        """
        if self.pending is not None:
            raise RuntimeError("infercache.stream: a forward is already open on this cache")
        self.pending = new
        self._lengths = [layer.get_seq_length() for layer in self.layers]
        self._shift = (shift_from, shift)
        self._rope = {}
        pos = new.pos + shift
        return pos[None] if pos.dim() == 1 else pos[:, None]

    def rope(self, layer_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``cos_old, sin_old, cos_new, sin_new`` for the open forward and a layer type."""
        if self.pending is None:
            raise RuntimeError(
                "infercache.stream: the model ran with a StreamCache outside stream.feed/ask; drive it through "
                "the stream, which assigns the positions"
            )
        if layer_type not in self._rope:
            shift_from, shift = self._shift
            old_pos = self.entries.pos
            if shift:
                old_pos = old_pos.clone()
                old_pos[..., shift_from:] += shift
                cos_old, sin_old = self.rotary.cos_sin(old_pos, layer_type)
            else:
                cached = self._old_rope.get(layer_type)
                if cached is None or cached[0].shape[0] != len(self.entries):
                    cached = self.rotary.cos_sin(old_pos, layer_type)
                    self._old_rope[layer_type] = cached
                cos_old, sin_old = cached
            cos_new, sin_new = self.rotary.cos_sin(self.pending.pos + shift, layer_type)
            self._rope[layer_type] = (cos_old, sin_old, cos_new, sin_new)
        return self._rope[layer_type]

    def commit(self) -> None:
        """Close the forward: the new entries are held (every layer must have seen them)."""
        new, shift = self.pending, self._shift[1]
        for layer, before in zip(self.layers, self._lengths):
            if layer.get_seq_length() != before + len(new):
                self.abort()
                raise RuntimeError(f"infercache.stream: layer {layer.layer_idx} did not see the forward")
        if not shift:
            for layer_type, (cos_old, sin_old, cos_new, sin_new) in self._rope.items():
                cached = self._old_rope.get(layer_type)
                if cached is not None and cached[0].shape[0] == len(self.entries):
                    self._old_rope[layer_type] = (torch.cat([cos_old, cos_new]), torch.cat([sin_old, sin_new]))
        self.entries = self.entries.cat(new)
        self.pending = None
        self._rope = {}

    def abort(self) -> None:
        """Close the forward without keeping it (a failed forward leaves no half-updated layer behind)."""
        for layer, n in zip(self.layers, self._lengths or [len(self.entries)] * len(self.layers)):
            if layer.keys is not None and layer.keys.shape[2] != n:
                layer.keys = layer.keys[:, :, :n]
                layer.values = layer.values[:, :, :n]
        self.pending = None
        self._rope = {}

    # ------------------------------------------------------------------ eviction
    def keep(self, idx: torch.Tensor) -> None:
        """Keep entries ``idx`` (sorted indices into the held ones) in every layer and re-position them."""
        if self.pending is not None:
            raise RuntimeError("infercache.stream: cannot evict while a forward is open")
        idx = torch.as_tensor(idx, dtype=torch.long)
        before = len(self.entries)
        for layer in self.layers:
            layer.select(idx, before)
        entries = self.entries.take(idx)
        entries.pos = reposition(entries.index, entries.pos)
        moved = not torch.equal(entries.pos, self.entries.pos[..., idx])
        self.entries = entries
        if moved:
            self._old_rope = {}
        else:  # nothing moved (e.g. a question truncated off the end): keep the cos/sin rows of the survivors
            self._old_rope = {k: (c[idx.to(c.device)], s[idx.to(s.device)])
                              for k, (c, s) in self._old_rope.items() if c.shape[0] == before}

    def make_local(self, sinks: int) -> None:
        """Make the sliding-window layers local: from now on :meth:`trim` keeps only their sinks and window."""
        if self.held:
            raise RuntimeError("infercache.stream: layers become local before the first forward")
        for layer in self.layers:
            if layer.layer_type == "sliding_attention" and self.sliding_window:
                layer.window, layer.sinks = self.sliding_window, sinks

    def trim(self) -> None:
        """Local (sliding-window) layers drop what no later token can see (after each fed chunk)."""
        if self.pending is not None:
            raise RuntimeError("infercache.stream: cannot trim while a forward is open")
        for layer in self.layers:
            layer.trim(len(self.entries))

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` entries (drop a question and its answer after ``ask``)."""
        if n < len(self.entries):
            self.keep(torch.arange(n))

    def kv(self, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Pre-RoPE ``(keys, values)`` of entries ``idx`` per layer, ``[H, n, D]`` (for offloading); ``None`` for a
        local layer (it does not hold old entries and never retrieves)."""
        out = []
        for layer in self.layers:
            if layer.window is not None:
                out.append(None)
                continue
            i = idx.to(layer.keys.device)
            out.append((layer.keys[0, :, i], layer.values[0, :, i]))
        return out

    # ------------------------------------------------------------------ reports
    def __len__(self) -> int:  # number of layers, as transformers expects
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Entries held (the same for every layer but local ones, which hold only their sinks and window)."""
        return len(self.entries)

    @property
    def held(self) -> int:
        return len(self.entries)

    def nbytes(self) -> int:
        """Bytes of keys and values held (all layers) plus the per-entry metadata."""
        return sum(layer.nbytes() for layer in self.layers) + self.entries.nbytes()
