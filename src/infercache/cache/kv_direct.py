"""KV-Direct (arXiv 2603.19664): keep K/V for a recent window, checkpoint the attention input for older tokens.

A layer's keys and values are deterministic functions of its input: ``k = RoPE_pos(k_norm?(W_k x))`` and
``v = W_v x`` with ``x`` the normed attention input (``x = input_layernorm(h)`` for the residual ``h``). So
for a token that left the recent window the cache can hold ``x`` (or ``h``) instead of K/V and recompute
K/V whenever attention needs them. Nothing is dropped: the output equals the full cache's.

How it plugs in (no model code is patched):

* forward pre-hooks on each decoder layer and on its ``self_attn`` hand the layer's input (``residual``
  mode) or the attention input (``attn_input`` mode, default) and the ``position_ids`` to the cache, but
  only when the forward's cache is a :class:`KVDirectCache` (otherwise the hooks do nothing);
* :meth:`KVDirectLayer.update` returns ``[recomputed K/V of the checkpointed tokens ; window K/V + new]``
  in chronological order, so every attention implementation (sdpa, eager, ``infercache``) works unchanged
  with transformers' own masks;
* recomputation goes through the layer's own modules: ``input_layernorm`` (residual mode), ``k_proj`` /
  ``v_proj`` or Phi-3's fused ``qkv_proj``, Qwen3/Gemma3 ``k_norm``, and the model's rotary embedding at
  the tokens' original ``position_ids`` with the modeling file's own ``apply_rotary_pos_emb``.

Two recompute modes:

* ``"batched"`` (default): one projection over all checkpointed tokens per layer and step. Tokens that
  were first computed in a forward of at least 4 rows are reproduced bit-exactly on our CPU build; tokens
  first computed one at a time (decode steps) go through a different GEMM kernel there (GEMV for 1 row)
  and differ in the last bits (|dK| ~ 1e-6): logits then agree to fp32 tolerance and greedy tokens match.
* ``"replay"``: each original forward ("chunk") is recomputed with exactly its original shape, so the
  same kernels produce the same bits: logits are bit-identical to ``DynamicCache`` (tested, fp32 and
  bf16). It costs one small projection per decoded token per layer and step (slow on long generations).

Memory (per token and layer): a checkpoint is ``hidden_size`` numbers, K+V is ``2 x kv_heads x head_dim``.
The checkpoint is smaller only when ``hidden_size < 2 x kv_heads x head_dim`` (MHA); for GQA/MQA models
it is *bigger* than the K/V it replaces (SmolLM2: 576 vs 384, Gemma-3-270M: 640 vs 512). The window also
holds the checkpoints of its own tokens (they are needed when a token leaves it): total bytes are
``seen x hidden + window x 2 x kv x head_dim`` per layer, plus 8 bytes per token for the positions.
Sliding-window layers (Gemma-3, Mistral with a window) keep transformers' bounded layer.
"""

from __future__ import annotations

import inspect
import sys
import time

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from .capture import decoder_layers, install_input_capture
from .compressed_cache import SeenTokensLayer

CHECKPOINTS = ("attn_input", "residual")
RECOMPUTE_MODES = ("batched", "replay")
_MIN_ROWS = 4  # CPU GEMM uses another kernel below 4 rows; pad so prompt tokens stay bit-exact
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


# ----------------------------------------------------------------------------------------------- helpers


def tensor_nbytes(tensors) -> int:
    """Bytes of the storages behind ``tensors`` (each storage once; a view counts its whole storage)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _rotary(model):
    """``rotary(positions [B, T], dtype, layer_type) -> (cos, sin)`` through the model's own rotary embedding."""
    emb = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if emb is None:
        raise NotImplementedError(f"kv_direct: {type(model).__name__} has no rotary_emb module")
    rope_types = emb.rope_type.values() if isinstance(emb.rope_type, dict) else [emb.rope_type]
    bad = sorted(set(rope_types) & set(_LENGTH_DEPENDENT_ROPE))
    if bad:
        raise NotImplementedError(
            f"kv_direct: rope type {bad[0]!r} changes its frequencies with the sequence length (and mutates the "
            "rotary module when called); recomputed keys would not match the cached ones"
        )
    takes_type = "layer_type" in inspect.signature(emb.forward).parameters

    def rotary(positions: torch.Tensor, dtype: torch.dtype, layer_type: str):
        dummy = torch.empty(0, dtype=dtype, device=positions.device)
        return emb(dummy, positions, layer_type) if takes_type else emb(dummy, positions)

    return rotary


class KVProjector:
    """K/V of one attention module from its checkpointed input, computed the way the module computes them."""

    def __init__(self, attn: torch.nn.Module, decoder_layer: torch.nn.Module, rotary, layer_type: str, checkpoint: str):
        self.attn = attn
        self.norm = decoder_layer.input_layernorm if checkpoint == "residual" else None
        if checkpoint == "residual" and self.norm is None:
            raise NotImplementedError("kv_direct: residual checkpoints need the decoder layer's input_layernorm")
        cfg = attn.config
        self.head_dim = attn.head_dim
        self.q_width = cfg.num_attention_heads * self.head_dim
        self.kv_width = cfg.num_key_value_heads * self.head_dim
        self.fused = hasattr(attn, "qkv_proj")
        if not self.fused and not (hasattr(attn, "k_proj") and hasattr(attn, "v_proj")):
            raise NotImplementedError(f"kv_direct: {type(attn).__name__} has neither k_proj/v_proj nor qkv_proj")
        if hasattr(attn, "v_norm"):
            raise NotImplementedError(f"kv_direct: {type(attn).__name__} normalises values (v_norm); not supported")
        self.k_norm = getattr(attn, "k_norm", None)
        # Qwen3 applies k_norm on [B, T, H, D] before the transpose; Gemma-3 after it (same values; we follow each).
        self.k_norm_after_transpose = cfg.model_type.startswith("gemma")
        self.apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.rotary = rotary
        self.layer_type = layer_type

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, exact: bool = False):
        """``hidden [B, T, d]``, ``positions [B|1, T]`` -> ``(k, v)`` as ``[B, Hkv, T, D]`` (keys after RoPE).

        ``exact``: call the modules with exactly this input (the original forward's shape); otherwise pad to
        at least ``_MIN_ROWS`` rows and, for a fused projection, project with the K/V rows of the weight only.
        """
        b, t = hidden.shape[:2]
        rows = b * t
        pad = 0 if exact or rows >= _MIN_ROWS else -(-(_MIN_ROWS - rows) // b)
        x = F.pad(hidden, (0, 0, 0, pad)) if pad else hidden
        if self.norm is not None:
            x = self.norm(x)
        if self.fused:
            if exact:
                kv = self.attn.qkv_proj(x)[..., self.q_width :]
            else:
                proj = self.attn.qkv_proj
                bias = None if proj.bias is None else proj.bias[self.q_width :]
                kv = F.linear(x, proj.weight[self.q_width :], bias)
            k, v = kv[..., : self.kv_width], kv[..., self.kv_width :]
        else:
            k, v = self.attn.k_proj(x), self.attn.v_proj(x)
        if pad:
            k, v = k[:, :t], v[:, :t]
        shape = (b, t, -1, self.head_dim)
        k, v = k.view(shape), v.view(shape)
        if self.k_norm is not None and not self.k_norm_after_transpose:
            k = self.k_norm(k)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.k_norm is not None and self.k_norm_after_transpose:
            k = self.k_norm(k)
        cos, sin = self.rotary(positions, hidden.dtype, self.layer_type)
        _, k = self.apply_rope(k[:, :0], k, cos, sin)
        return k, v


# -------------------------------------------------------------------------------------------------- layer


class KVDirectLayer(SeenTokensLayer):
    """One full-attention layer: K/V of the last ``window`` tokens, input checkpoints for all older tokens.

    ``keys``/``values`` ``[B, Hkv, n_window, D]`` and ``window_hidden`` ``[B, n_window, d]`` cover the recent
    tokens; ``checkpoints`` ``[B, n_old, d]`` the older ones (always the first ``n_old`` tokens seen).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "KVDirectCache", layer_idx: int, projector: KVProjector, window: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.projector = projector
        self.window = window
        self.seen = 0
        self.window_hidden = None
        self.checkpoints = None
        self.pending = None
        self.recompute_seconds = 0.0
        self.recomputed_tokens = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    @property
    def n_old(self) -> int:
        return 0 if self.checkpoints is None else self.checkpoints.shape[1]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pending, self.pending = self.pending, None
        q = key_states.shape[-2]
        if pending is None or pending[0].shape[:2] != (key_states.shape[0], q):
            raise RuntimeError(
                f"kv_direct: layer {self.layer_idx} got K/V without its captured input; build the cache with "
                "build_kv_direct_cache(model) (it installs the capture hooks) and pass it as cache=..."
            )
        hidden, positions = pending
        self.cache._log_positions(self, positions, q)
        self.seen += q

        old = self._recompute()
        win_k = key_states if self.keys is None else torch.cat([self.keys, key_states], dim=-2)
        win_v = value_states if self.values is None else torch.cat([self.values, value_states], dim=-2)
        hidden = hidden.detach()
        win_h = hidden if self.window_hidden is None else torch.cat([self.window_hidden, hidden], dim=1)
        out_k = win_k if old is None else torch.cat([old[0], win_k], dim=-2)
        out_v = win_v if old is None else torch.cat([old[1], win_v], dim=-2)

        drop = win_k.shape[-2] - self.window
        if drop > 0:  # the oldest window tokens become checkpoints; their K/V are freed
            leaving = win_h[:, :drop]
            self.checkpoints = leaving.clone() if self.checkpoints is None else torch.cat([self.checkpoints, leaving], 1)
            self.keys, self.values = win_k[:, :, drop:].clone(), win_v[:, :, drop:].clone()
            self.window_hidden = win_h[:, drop:].clone()
        else:
            self.keys, self.values, self.window_hidden = win_k, win_v, win_h
        return out_k, out_v

    def _recompute(self):
        n_old = self.n_old
        if n_old == 0:
            return None
        start = time.perf_counter()
        positions = self.cache.positions
        if self.cache.recompute == "batched":
            k, v = self.projector(self.checkpoints, positions[:, :n_old])
        else:
            parts_k, parts_v = [], []
            for begin, length in self.cache.chunks:
                if begin >= n_old:
                    break
                end = begin + length
                hidden = self._hidden_range(begin, end)
                k, v = self.projector(hidden, positions[:, begin:end], exact=True)
                keep = min(end, n_old) - begin
                parts_k.append(k[:, :, :keep])
                parts_v.append(v[:, :, :keep])
            k, v = torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)
        self.recompute_seconds += time.perf_counter() - start
        self.recomputed_tokens += n_old
        return k, v

    def _hidden_range(self, begin: int, end: int) -> torch.Tensor:
        n_old = self.n_old
        if end <= n_old:
            return self.checkpoints[:, begin:end].contiguous()
        return torch.cat([self.checkpoints[:, begin:], self.window_hidden[:, : end - n_old]], dim=1)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.keys is not None else -1

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx, self.projector, self.window)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "kv_direct: beam search, num_return_sequences > 1 and cache cropping are not supported; use greedy or "
            "sampling with one sequence per prompt"
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = _unsupported

    def nbytes_breakdown(self) -> dict[str, int]:
        return {
            "checkpoints": tensor_nbytes([self.checkpoints]),
            "window_kv": tensor_nbytes([self.keys, self.values]),
            "window_checkpoints": tensor_nbytes([self.window_hidden]),
        }

    def nbytes(self) -> int:
        return sum(self.nbytes_breakdown().values())


# -------------------------------------------------------------------------------------------------- cache


class KVDirectCache(Cache):
    """A transformers ``Cache``: full-attention layers keep K/V for the last ``window`` tokens and input
    checkpoints for older ones (recomputed each step); output equals the full cache's.

    Build with :func:`build_kv_direct_cache`. One cache serves one sequence of forwards (or one ``generate``).
    """

    def __init__(self, model, window: int = 64, checkpoint: str = "attn_input", recompute: str = "batched"):
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"kv_direct: window must be an int >= 0 (tokens whose K/V are kept), got {window!r}")
        if checkpoint not in CHECKPOINTS:
            raise ValueError(f"kv_direct: checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"kv_direct: recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        config = model.config.get_text_config(decoder=True)
        layer_types, kwargs = get_layer_types_and_kwargs(config)
        decoders = decoder_layers(model)
        rotary = _rotary(model)
        layers = []
        for idx, (kind, kw) in enumerate(zip(layer_types, kwargs)):
            if kind == "full_attention":
                if idx not in decoders:
                    raise NotImplementedError(f"kv_direct: no decoder layer found for layer {idx}")
                projector = KVProjector(decoders[idx].self_attn, decoders[idx], rotary, kind, checkpoint)
                layers.append(KVDirectLayer(self, idx, projector, window))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kw))
            else:
                raise NotImplementedError(f"kv_direct: layer type {kind!r} (layer {idx}) is not supported")
        super().__init__(layers=layers)
        self.window = window
        self.checkpoint = checkpoint
        self.recompute = recompute
        direct = [layer.layer_idx for layer in layers if isinstance(layer, KVDirectLayer)]
        self.position_owner = min(direct) if direct else None
        self.positions = None  # [B|1, seen] int64, shared by all layers
        self.chunks: list[tuple[int, int]] = []  # (first token, length) of each forward, for "replay"

    # ------------------------------------------------------------------ capture
    def capture_layer_input(self, layer_idx: int, hidden, position_ids) -> None:
        """Capture hook (:mod:`.capture`): a decoder layer's input, the checkpoint when ``checkpoint="residual"``."""
        if self.checkpoint == "residual":
            self._capture(layer_idx, hidden, position_ids)

    def capture_attention_input(self, layer_idx: int, hidden, position_ids) -> None:
        """Capture hook (:mod:`.capture`): the attention input, the checkpoint when ``checkpoint="attn_input"``."""
        if self.checkpoint == "attn_input":
            self._capture(layer_idx, hidden, position_ids)

    def _capture(self, layer_idx: int, hidden, position_ids) -> None:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, KVDirectLayer):
            if hidden is None:
                raise RuntimeError(f"kv_direct: could not find the input of layer {layer_idx}")
            layer.pending = (hidden, position_ids)

    def _log_positions(self, layer: KVDirectLayer, position_ids, q: int) -> None:
        if layer.layer_idx != self.position_owner:
            return
        if position_ids is None:
            position_ids = torch.arange(layer.seen, layer.seen + q, device=layer.device)[None]
        position_ids = position_ids.detach().to(torch.long)
        if self.positions is None:
            self.positions = position_ids.clone()
        else:
            if self.positions.shape[0] != position_ids.shape[0]:
                rows = max(self.positions.shape[0], position_ids.shape[0])
                self.positions = self.positions.expand(rows, -1)
                position_ids = position_ids.expand(rows, -1)
            self.positions = torch.cat([self.positions, position_ids], dim=1)
        self.chunks.append((layer.seen, q))

    # ------------------------------------------------------------------ reports
    def nbytes_breakdown(self) -> dict[str, int]:
        """Bytes held, by kind, walking the tensors: ``checkpoints`` (old tokens), ``window_kv``,
        ``window_checkpoints`` (inputs of the window's tokens, kept for when they leave), ``positions``,
        ``sliding_kv`` (transformers' bounded layers)."""
        out = {"checkpoints": 0, "window_kv": 0, "window_checkpoints": 0, "positions": tensor_nbytes([self.positions]),
               "sliding_kv": 0}
        for layer in self.layers:
            if isinstance(layer, KVDirectLayer):
                for key, value in layer.nbytes_breakdown().items():
                    out[key] += value
            elif layer.is_initialized:
                out["sliding_kv"] += tensor_nbytes([layer.keys, layer.values])
        return out

    def nbytes(self) -> int:
        """All bytes the cache holds (checkpoints, window K/V and inputs, positions, sliding layers)."""
        return sum(self.nbytes_breakdown().values())

    def lengths(self) -> list[torch.Tensor | None]:
        """K/V entries held per layer as ``[B, Hkv]`` (the window; checkpointed tokens hold no K/V)."""
        out = []
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None:
                b, h, n = layer.keys.shape[:3]
                out.append(torch.full((b, h), n, dtype=torch.long))
            else:
                out.append(None)
        return out

    def recompute_seconds(self) -> float:
        """Wall time spent recomputing K/V so far, all layers."""
        return sum(layer.recompute_seconds for layer in self.layers if isinstance(layer, KVDirectLayer))

    def report(self) -> dict:
        return {
            "method": "kv_direct",
            "window": self.window,
            "checkpoint": self.checkpoint,
            "recompute": self.recompute,
            "seen_tokens": self.get_seq_length(),
            "nbytes": self.nbytes(),
            "breakdown": self.nbytes_breakdown(),
            "checkpointed_tokens": [layer.n_old for layer in self.layers if isinstance(layer, KVDirectLayer)],
            "recompute_seconds": self.recompute_seconds(),
        }


def build_kv_direct_cache(model, window: int = 64, *, checkpoint: str = "attn_input", recompute: str = "batched",
                          budget: int | None = None) -> KVDirectCache:
    """A KV-Direct cache for ``model`` (installs the capture hooks once; they are inert for other caches).

    ``window`` (alias ``budget``): recent tokens whose K/V are kept (``0``: keep none, recompute everything).
    ``checkpoint``: ``"attn_input"`` (the normed attention input; default) or ``"residual"`` (the layer's
    input residual; recompute also runs ``input_layernorm``). Same bytes either way. ``recompute``:
    ``"batched"`` or ``"replay"`` (bit-exact; see the module docstring). Works with any attention
    implementation; nothing about the model is changed besides the inert hooks.
    """
    if budget is not None:
        if window != 64 and window != budget:
            raise ValueError("kv_direct: give window or budget, not both")
        window = budget
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError("kv_direct: decoder-only causal LMs only")
    cache = KVDirectCache(model, window=window, checkpoint=checkpoint, recompute=recompute)
    install_input_capture(model)
    return cache
